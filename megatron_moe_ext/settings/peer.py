"""Settings of PEER layers, checked before any model is built (pure: no Megatron, no tensors).

``peer_settings`` builds ``PEERSettings`` (the layout, the layer numbers and every ``moe_peer_*``
value) for the config and the flag path alike. ``peer_layout`` validates the expert grid and retrieval sizes, ``peer_layer_numbers`` turns
--moe-peer-layers into Megatron's 1-based layer numbers, ``table_shard`` says which expert rows a
rank owns (and the padding applied when N does not divide), ``check_peer_parallel`` the
parallel layout, ``check_peer_subkey_loss`` the subkey loss's marginals and stride. Every failure
is a ValueError naming the values and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

PEER_ACTIVATIONS = ("gelu", "relu", "silu")
PEER_GATES = ("softmax", "sigmoid")
PEER_SHARDS = ("tp", "ep")
PEER_BACKENDS = ("auto", "eager", "chunked", "embedding_bag", "cpu_fused", "triton")
# Soft marginals of the PEER subkey loss: the retrieval's candidates (O(k') per token) or all n sub-keys.
PEER_SUBKEY_MARGINALS = ("candidates", "full")


@dataclasses.dataclass(frozen=True)
class PEERLayout:
    """Retrieval geometry: an n x n grid of N experts shared by ``heads`` heads, each selecting
    ``topk`` experts from ``subkey_topk``^2 candidates with queries of ``key_dim``."""

    num_experts: int
    grid: int
    heads: int
    topk: int
    key_dim: int
    subkey_topk: int

    @property
    def granularity(self) -> int:
        """G = heads * topk single-neuron experts per token (algorithms.md section 1)."""
        return self.heads * self.topk


def peer_layout(num_experts: int, *, heads: int, topk: int, key_dim: int, subkey_topk: int | None = None) -> PEERLayout:
    """The validated PEER geometry."""
    if num_experts < 1:
        raise ValueError(f"moe_peer_num_experts={num_experts} must be >= 1; fix: use n*n experts, e.g. {1024 * 1024}")
    n = math.isqrt(num_experts)
    if n * n != num_experts:
        raise ValueError(
            f"moe_peer_num_experts={num_experts} is not a perfect square, so no n x n product-key grid exists; "
            f"fix: use {n * n} or {(n + 1) ** 2} experts"
        )
    if heads < 1:
        raise ValueError(f"moe_peer_heads={heads} must be >= 1; fix: e.g. 8 (the paper's)")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"moe_peer_topk={topk} must be in [1, {num_experts}] (experts per head and token); fix: e.g. 16")
    if key_dim < 2 or key_dim % 2:
        raise ValueError(
            f"moe_peer_key_dim={key_dim} must be even and >= 2 (half scores the row sub-keys, half the column ones); "
            f"fix: use {max(2, key_dim + key_dim % 2)}"
        )
    kp = topk if subkey_topk is None else subkey_topk
    # Exact iff each side keeps min(k, n) sub-keys (a top-k pair ranks within the top k of its row and column, and
    # within n): a top-k above the grid side works, with every sub-key of a side kept.
    if kp < min(topk, n):
        raise ValueError(
            f"moe_peer_subkey_topk={kp} < min(moe_peer_topk={topk}, n={n}): the product-key top-k is exact only if each "
            f"side keeps >= min(top-k, n) sub-keys; fix: --moe-peer-subkey-topk {min(topk, n)} or more, or leave it unset"
        )
    if kp > max(topk, n):
        raise ValueError(
            f"moe_peer_subkey_topk={kp} exceeds the {n} sub-keys per side of a {n}x{n} grid; fix: at most {max(topk, n)}"
        )
    return PEERLayout(num_experts, n, heads, topk, key_dim, min(kp, n))


def peer_layer_numbers(spec: str, num_layers: int) -> list[int]:
    """1-based numbers of the layers whose MLP is a PEER layer.

    ``spec``: 'middle' (layer ceil(L/2), the paper's single middle block), 'all', or a
    comma-separated list of 1-based layer numbers such as '2,4'.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    text = spec.strip().lower()
    if text == "middle":
        return [(num_layers + 1) // 2]
    if text == "all":
        return list(range(1, num_layers + 1))
    try:
        numbers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(
            f"moe_peer_layers={spec!r} is not 'middle', 'all' or a comma-separated list of layer numbers; "
            "fix: e.g. --moe-peer-layers middle or --moe-peer-layers 2,4"
        ) from None
    bad = [x for x in numbers if not 1 <= x <= num_layers]
    if not numbers or bad:
        raise ValueError(
            f"moe_peer_layers={spec!r} names layer(s) {bad or '(none)'} outside 1..{num_layers} (layers are numbered "
            f"from 1, num_layers={num_layers}); fix: choose numbers in 1..{num_layers}"
        )
    return numbers


@dataclasses.dataclass(frozen=True)
class TableShard:
    """Expert rows [first, end) of the table owned by one of ``shards`` ranks; every rank stores
    ``rows`` rows (the last one's tail is padding when N does not divide, never selected)."""

    first: int
    end: int
    rows: int
    shards: int

    @property
    def padding(self) -> int:
        """Rows of this rank beyond the last expert."""
        return self.first + self.rows - self.end


def table_shard(num_experts: int, rank: int, shards: int) -> TableShard:
    """Rows of ``rank``: contiguous blocks of ceil(N / shards) expert ids (equal-sized shards for
    distributed checkpoints; the padding is rows * shards - N rows at the end of the last ranks)."""
    if shards < 1 or not 0 <= rank < shards:
        raise ValueError(f"rank {rank} of {shards} shards is not a valid position")
    rows = -(-num_experts // shards)
    first = min(rank * rows, num_experts)
    return TableShard(first, min(first + rows, num_experts), rows, shards)


def padded_rows(num_experts: int, shards: int) -> int:
    """Global rows stored across ``shards`` ranks: N rounded up to a multiple of ``shards``."""
    return -(-num_experts // shards) * shards


def check_peer_parallel(*, shard: str, tp: int, ep: int) -> None:
    """The table sharding must match the parallel layout."""
    if shard not in PEER_SHARDS:
        raise ValueError(f"moe_peer_shard={shard!r} is unknown; choose from {', '.join(PEER_SHARDS)}")
    if shard == "ep":
        if ep < 2:
            raise ValueError(
                f"moe_peer_shard='ep' shards the expert tables over the expert-parallel group, but "
                f"expert_model_parallel_size={ep}; fix: --expert-model-parallel-size 2 (or more), or --moe-peer-shard tp"
            )
        if tp > 1:
            raise ValueError(
                f"moe_peer_shard='ep' with tensor_model_parallel_size={tp} is not supported (the tables would be "
                "replicated over TP); fix: --moe-peer-shard tp (tables split over TP), or --tensor-model-parallel-size 1"
            )


def check_peer_subkey_loss(*, marginals: str, stride: int) -> None:
    """The PEER subkey loss's soft marginals (``PEER_SUBKEY_MARGINALS``) and token stride.

    The stride thins the tokens of the dense full marginals; the candidate marginals are already
    O(k') per token, so a stride there would only discard tokens: refused rather than ignored.
    """
    if marginals not in PEER_SUBKEY_MARGINALS:
        raise ValueError(
            f"moe_peer_subkey_loss_marginals={marginals!r} is unknown; choose from {', '.join(PEER_SUBKEY_MARGINALS)}"
        )
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"moe_peer_subkey_loss_stride={stride!r} must be an int >= 1; "
                         "fix: 1 (exact) or e.g. 16 (marginals from every 16th token)")
    if stride > 1 and marginals == "candidates":
        raise ValueError(
            f"moe_peer_subkey_loss_stride={stride} with moe_peer_subkey_loss_marginals='candidates': the stride "
            "only thins the tokens of the full (dense) marginals, the candidate marginals already cost O(k') per "
            f"token; fix: --moe-peer-subkey-loss-marginals full --moe-peer-subkey-loss-stride {stride}, or drop "
            "--moe-peer-subkey-loss-stride"
        )


def check_peer_table_mults(*, lr_mult: float, wd_mult: float) -> None:
    """The PEER tables' learning-rate and weight-decay multipliers (optimizer parameter groups)."""
    for name, value in (("moe_peer_table_lr_mult", lr_mult), ("moe_peer_table_wd_mult", wd_mult)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0; fix: e.g. 1.0 (unchanged) or 0 (frozen / no decay)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PEERSettings:
    """PEER layers (``MoEExtConfig.moe_peer_*``): ``layout`` None and ``layers`` empty without
    --moe-peer-num-experts; the other values as given."""

    layout: PEERLayout | None
    layers: tuple[int, ...]
    query_norm: str
    activation: str
    gate: str
    shared_ffn_hidden_size: int | None
    backend: str
    chunk_pairs: int
    deterministic: bool
    shard: str
    table_lr_mult: float
    table_wd_mult: float
    subkey_loss_stride: int
    subkey_loss_marginals: str

    @property
    def enabled(self) -> bool:
        return self.layout is not None


def peer_settings(get: Callable[[str], Any]) -> PEERSettings:
    """The PEER settings, checked when PEER layers are on, reading by ``MoEExtConfig`` field name
    through ``get(name)`` (the config, or Megatron's args through a name map)."""
    values = dict(
        query_norm=get("moe_peer_query_norm"), activation=get("moe_peer_activation"), gate=get("moe_peer_gate"),
        shared_ffn_hidden_size=get("moe_peer_shared_ffn_hidden_size"), backend=get("moe_peer_backend"),
        chunk_pairs=get("moe_peer_chunk_pairs"), deterministic=bool(get("moe_peer_deterministic")),
        shard=get("moe_peer_shard"), table_lr_mult=get("moe_peer_table_lr_mult"),
        table_wd_mult=get("moe_peer_table_wd_mult"), subkey_loss_stride=get("moe_peer_subkey_loss_stride"),
        subkey_loss_marginals=get("moe_peer_subkey_loss_marginals"),
    )
    num_experts = get("moe_peer_num_experts")
    if num_experts is None:
        return PEERSettings(layout=None, layers=(), **values)
    layout = peer_layout(
        num_experts, heads=get("moe_peer_heads"), topk=get("moe_peer_topk"), key_dim=get("moe_peer_key_dim"),
        subkey_topk=get("moe_peer_subkey_topk"),
    )
    layers = tuple(peer_layer_numbers(get("moe_peer_layers"), get("num_layers")))
    check_peer_parallel(shard=values["shard"], tp=get("tensor_model_parallel_size"), ep=get("expert_model_parallel_size"))
    check_peer_subkey_loss(marginals=values["subkey_loss_marginals"], stride=values["subkey_loss_stride"])
    if values["chunk_pairs"] < 1:
        raise ValueError(f"moe_peer_chunk_pairs={values['chunk_pairs']} must be >= 1; fix: e.g. 16384")
    check_peer_table_mults(lr_mult=values["table_lr_mult"], wd_mult=values["table_wd_mult"])
    return PEERSettings(layout=layout, layers=layers, **values)
