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

No torch here: the launcher, the ``flops`` command and config validation all use it;
``granularity_settings`` is the one place the derivation and its conflicts are decided.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class GranularitySettings:
    """--moe-granularity and its companions; ``sizes`` is what they derive (None without a granularity)."""

    granularity: int | None
    expansion_rate: int | None
    base_topk: int
    num_shared_experts: int
    sizes: FineGrainedSizes | None

    def derived(self) -> dict[str, int | None]:
        """TransformerConfig field -> the value the granularity gives it (empty without a granularity)."""
        if self.sizes is None:
            return {}
        return {name: getattr(self.sizes, field) for field, (name, _) in DERIVED_SETTINGS.items()}


def granularity_settings(get: Callable[[str], Any]) -> GranularitySettings:
    """The granularity settings, read through ``get(name)`` by MoEExtConfig/TransformerConfig field name.

    ``get("moe_router_topk")`` must read None when the user did not set it (the flag path knows; a
    config cannot tell an explicit value from Megatron's default, so it passes None for that default):
    a derived value contradicting an explicitly set one is refused, naming both.
    """
    g = get("moe_granularity")
    common = dict(granularity=g, expansion_rate=get("moe_expansion_rate"), base_topk=get("moe_base_topk"),
                  num_shared_experts=get("moe_num_shared_experts"))
    if g is None:
        if common["num_shared_experts"]:
            raise ValueError(
                f"--moe-num-shared-experts {common['num_shared_experts']} needs --moe-granularity (shared experts "
                "are sized ffn_hidden_size/G); fix: add --moe-granularity, or use Megatron's "
                "--moe-shared-expert-intermediate-size"
            )
        return GranularitySettings(**common, sizes=None)
    e, k0 = common["expansion_rate"], common["base_topk"]
    if e is None:
        raise ValueError(
            f"--moe-granularity {g} needs --moe-expansion-rate (E, experts = E*G); fix: add e.g. --moe-expansion-rate 8"
        )
    ffn = get("ffn_hidden_size")
    if ffn is None:
        raise ValueError(
            f"--moe-granularity {g} derives expert sizes from the dense FFN size; fix: pass --ffn-hidden-size"
        )
    sizes = derive_fine_grained(
        ffn, g, e, k0,
        num_shared_experts=common["num_shared_experts"],
        expert_parallel_size=get("expert_model_parallel_size"),
        fp8_recipe=get("fp8_recipe") if get("fp8") else None,
    )
    conflicts = [
        f"{flag} {value} (G implies {getattr(sizes, field)})"
        for field, (name, flag) in DERIVED_SETTINGS.items()
        if (value := get(name)) is not None and value != getattr(sizes, field)
    ]
    if conflicts:
        raise ValueError(
            f"--moe-granularity {g} --moe-expansion-rate {e} --moe-base-topk {k0} contradict {'; '.join(conflicts)}. "
            "Fix: drop those flags (they are derived from G) or drop --moe-granularity."
        )
    return GranularitySettings(**common, sizes=sizes)


def check_upcycling_granularity(granularity: int | None, *, upcycling: bool, upcycling_granularity: int) -> None:
    """Megatron's --moe-upcycling-granularity (a training flag, no config field) cannot be combined with ours."""
    if granularity is not None and upcycling and upcycling_granularity != 1:
        raise ValueError(
            f"--moe-upcycling-granularity {upcycling_granularity} with --moe-granularity {granularity}: the upcycling "
            "granularity is G itself (--ffn-hidden-size stays the dense size); fix: drop --moe-upcycling-granularity"
        )
