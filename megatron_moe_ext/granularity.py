"""Fine-grained MoE sizing: granularity G, expansion rate E and base top-k k0 (pure arithmetic).

Krajewski, Ludziejewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of Experts"
(arXiv 2402.07871): from a dense FFN of hidden size ``d_ff``,

    experts            = E * G
    expert hidden size = d_ff / G
    top-k              = k0 * G

so active parameters and FLOPs per token stay constant as G grows (G = 1 is coarse MoE; G = d_ff
makes single-neuron experts, the regime of the PEER layer). Shared experts, when asked for, are
DeepSeekMoE-style fine-grained experts of the same size: K_s shared experts add a shared MLP of
hidden size ``K_s * d_ff / G``.

No torch here: the launcher, the ``flops`` command and config validation all use it.
"""

from __future__ import annotations

import dataclasses
import warnings

# Transformer Engine pads each expert's rows and needs GEMM dims to be multiples of these.
FP8_ALIGNMENT = {"default": 16, "mxfp8": 32}


@dataclasses.dataclass(frozen=True)
class FineGrainedSizes:
    """Megatron MoE settings derived from (d_ff, G, E, k0)."""

    num_experts: int
    moe_ffn_hidden_size: int
    topk: int
    shared_expert_intermediate_size: int | None


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _nearest(candidates: list[int], target: int) -> int:
    return min(candidates, key=lambda c: (abs(c - target), c))


def derive_fine_grained(
    ffn_hidden_size: int,
    granularity: int,
    expansion_rate: int,
    base_topk: int = 1,
    *,
    num_shared_experts: int = 0,
    expert_parallel_size: int = 1,
    fp8_recipe: str | None = None,
) -> FineGrainedSizes:
    """Derive experts, expert size and top-k; ValueError (with the nearest valid choice) if the
    combination cannot be built."""
    for name, value in (
        ("ffn_hidden_size", ffn_hidden_size),
        ("granularity", granularity),
        ("expansion_rate", expansion_rate),
        ("base_topk", base_topk),
        ("expert_parallel_size", expert_parallel_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if num_shared_experts < 0:
        raise ValueError(f"num_shared_experts={num_shared_experts} must be >= 0")
    if ffn_hidden_size % granularity:
        nearest = _nearest(_divisors(ffn_hidden_size), granularity)
        raise ValueError(
            f"granularity G={granularity} does not divide ffn_hidden_size={ffn_hidden_size} "
            f"(expert size would be {ffn_hidden_size / granularity:g}); nearest valid G: {nearest}"
        )
    expert_size = ffn_hidden_size // granularity
    num_experts = expansion_rate * granularity
    topk = base_topk * granularity
    if topk > num_experts:
        raise ValueError(
            f"top-k = base_topk*G = {base_topk}*{granularity} = {topk} exceeds the number of experts "
            f"E*G = {expansion_rate}*{granularity} = {num_experts}; fix: base_topk <= expansion_rate "
            f"(nearest valid base_topk: {expansion_rate})"
        )
    if num_experts % expert_parallel_size:
        valid_e = [e for e in range(1, 4 * expansion_rate + expert_parallel_size + 1) if (e * granularity) % expert_parallel_size == 0]
        raise ValueError(
            f"E*G = {expansion_rate}*{granularity} = {num_experts} experts are not divisible by expert "
            f"parallel size {expert_parallel_size}; nearest valid expansion rate: "
            f"{_nearest(valid_e, expansion_rate)} (or an EP size dividing {num_experts})"
        )
    if fp8_recipe is not None:
        align = FP8_ALIGNMENT["mxfp8" if fp8_recipe == "mxfp8" else "default"]
        if expert_size % align:
            valid = [g for g in _divisors(ffn_hidden_size) if (ffn_hidden_size // g) % align == 0]
            hint = f"nearest valid G: {_nearest(valid, granularity)}" if valid else f"no G works for ffn_hidden_size={ffn_hidden_size}"
            raise ValueError(
                f"FP8 ({fp8_recipe}) needs expert hidden sizes that are multiples of {align}, but "
                f"ffn_hidden_size/G = {ffn_hidden_size}/{granularity} = {expert_size}; {hint}"
            )
    if expert_size == 1:
        warnings.warn(
            f"G = ffn_hidden_size = {ffn_hidden_size} makes single-neuron experts: Megatron's MoELayer "
            "keeps a dense [tokens x experts] routing map and one expert slot per neuron; the PEER layer "
            "(product-key retrieval over sharded expert tables) is built for this regime.",
            stacklevel=2,
        )
    shared = num_shared_experts * expert_size if num_shared_experts else None
    return FineGrainedSizes(num_experts, expert_size, topk, shared)


# FineGrainedSizes field -> (TransformerConfig field, Megatron flag) that it determines.
DERIVED_SETTINGS: dict[str, tuple[str, str]] = {
    "num_experts": ("num_moe_experts", "--num-experts"),
    "moe_ffn_hidden_size": ("moe_ffn_hidden_size", "--moe-ffn-hidden-size"),
    "topk": ("moe_router_topk", "--moe-router-topk"),
    "shared_expert_intermediate_size": ("moe_shared_expert_intermediate_size", "--moe-shared-expert-intermediate-size"),
}


def explicit_conflicts(sizes: FineGrainedSizes, explicit: dict[str, tuple[str, int | None]]) -> list[str]:
    """``'<label><value> (G implies <derived>)'`` for each explicitly set value the derivation
    contradicts; ``explicit`` maps a FineGrainedSizes field to (label, value or None if unset)."""
    return [
        f"{label}{value} (G implies {getattr(sizes, field)})"
        for field, (label, value) in explicit.items()
        if value is not None and value != getattr(sizes, field)
    ]
