"""Load-balance metrics, cheap enough to log every step at N = 1M experts: O(N) work on counts, no per-token
traces. Counts come from the caller (``expert_counts``, ``subkey_counts``), all-reduced as wanted; every
function is pure except :class:`UsageWindow`, which keeps O(N) state.

Legend: N experts, D EP ranks (ep_size), H product-key heads, n1 x n2 sub-key grid per head, W window (steps).
"""

from __future__ import annotations

import dataclasses
import math

import torch

Tensor = torch.Tensor


def _check_counts(counts: Tensor, dims: int, name: str, layout: str) -> Tensor:
    if counts.dim() != dims or counts.numel() == 0 or counts.dtype == torch.bool or counts.is_complex():
        raise ValueError(f"{name} of shape {tuple(counts.shape)} and dtype {counts.dtype}: expected non-empty "
                         f"numeric {layout} loads; fix: pass selections per expert, e.g. routing_map.sum(0)")
    # fp64: at N = 1M the mean and the entropy need more than fp32's 24 bits.
    return counts.to(torch.float64)


def _max_violation(load: Tensor) -> Tensor:
    """(max - mean) / mean along the last dim; NaN where the mean load is 0 (undefined, not balanced)."""
    mean = load.mean(-1)
    return (load.amax(-1) - mean) / mean.where(mean > 0, torch.full_like(mean, float("nan")))


def max_violation(counts_N: Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load (Wang et al. 2024, arXiv 2408.15664): 0 at perfect
    balance, N - 1 when one expert takes everything. NaN when there is no load at all."""
    return float(_max_violation(_check_counts(counts_N, 1, "counts_N", "[N]")))


def _per_rank(counts_N: Tensor, ep_size: int) -> Tensor:
    load_N = _check_counts(counts_N, 1, "counts_N", "[N]")
    N = load_N.shape[0]
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or N % ep_size:
        raise ValueError(f"ep_size={ep_size!r} must be an int >= 1 dividing N={N} (Megatron places N/ep_size experts "
                         f"contiguously per EP rank); fix: an ep_size among the divisors of {N}")
    return load_N.view(ep_size, N // ep_size)


def max_violation_per_rank(counts_N: Tensor, ep_size: int) -> Tensor:
    """maxvio_D (fp64): MaxVio among the experts of each EP rank (contiguous placement, N/D experts each);
    the imbalance a rank's grouped GEMM sees. NaN for a rank that received nothing."""
    return _max_violation(_per_rank(counts_N, ep_size))


def device_max_violation(counts_N: Tensor, ep_size: int) -> float:
    """MaxVio of the per-rank loads (sums over each rank's experts): the straggler rank's excess over the mean."""
    return float(_max_violation(_per_rank(counts_N, ep_size).sum(-1)))


def load_entropy(counts_N: Tensor, normalized: bool = True) -> float:
    """Entropy -sum_i p_i log p_i of the load distribution p = counts / sum (0 log 0 = 0), in nats; with
    ``normalized`` divided by log N so that 1 = uniform and 0 = one expert takes all (1.0 for N = 1). NaN when
    there is no load."""
    load_N = _check_counts(counts_N, 1, "counts_N", "[N]")
    total = load_N.sum()
    if float(total) <= 0:
        return float("nan")
    p_N = load_N / total
    h = float(-(p_N * torch.log(p_N.where(p_N > 0, torch.ones_like(p_N)))).sum())
    if not normalized:
        return h
    return 1.0 if load_N.shape[0] == 1 else h / math.log(load_N.shape[0])


class UsageWindow:
    """Fraction of experts used at least once in the last W steps, streaming, O(N) memory.

    Keeps, per expert, the last step it was used (int64, 8 MB at N = 1M); a step's update and query are one
    O(N) pass each. "Used in the last W steps" at step s means used at a step in (s - W, s].
    """

    _NEVER = -(2**62)

    def __init__(self, num_experts: int, window: int, *, device: torch.device | str | None = None) -> None:
        for name, value in (("num_experts", num_experts), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1; fix: UsageWindow(num_experts=N, window=W steps)")
        self.num_experts = num_experts
        self.window = window
        self.last_used_N = torch.full((num_experts,), self._NEVER, dtype=torch.int64, device=device)
        self.last_step: int | None = None

    def update(self, counts_N: Tensor, step: int) -> None:
        """Record step ``step``'s loads (counts_N [N], > 0 = used). Steps must not go backwards."""
        if tuple(counts_N.shape) != (self.num_experts,):
            raise ValueError(f"counts_N of shape {tuple(counts_N.shape)}: expected [{self.num_experts}]; fix: pass "
                             "one count per expert of this layer")
        if self.last_step is not None and step < self.last_step:
            raise ValueError(f"step={step} is before the last update's step {self.last_step}; fix: pass the "
                             "training iteration, which only grows")
        self.last_step = step
        used_N = counts_N.to(self.last_used_N.device) > 0
        self.last_used_N.masked_fill_(used_N, step)

    def fraction_used(self, step: int) -> float:
        """Fraction of experts used at some step in (step - window, step]."""
        return float((self.last_used_N > step - self.window).sum()) / self.num_experts


@dataclasses.dataclass(frozen=True)
class SubkeyUsage:
    """Product-key row / column usage (fractions over all heads' rows or columns; MaxVio the worst head's)."""

    row_fraction_used: float
    col_fraction_used: float
    row_max_violation: float
    col_max_violation: float


def subkey_usage(row_counts: Tensor, col_counts: Tensor) -> SubkeyUsage:
    """Usage of the sub-key rows and columns from ``subkey_counts``: [H, n1] / [H, n2] (or [n1] / [n2]).

    Each head balances its own pool, so MaxVio is taken per head and the worst head reported (NaN for a head
    with no selections).
    """
    rows_Hn1 = _check_counts(row_counts, row_counts.dim(), "row_counts", "[H, n1] or [n1]")
    cols_Hn2 = _check_counts(col_counts, col_counts.dim(), "col_counts", "[H, n2] or [n2]")
    if rows_Hn1.dim() not in (1, 2) or rows_Hn1.dim() != cols_Hn2.dim() or rows_Hn1.shape[:-1] != cols_Hn2.shape[:-1]:
        raise ValueError(f"row_counts {tuple(row_counts.shape)} and col_counts {tuple(col_counts.shape)}: expected "
                         "[H, n1] and [H, n2] with the same H (or [n1] and [n2]); fix: pass subkey_counts' outputs")
    rows_Hn1, cols_Hn2 = rows_Hn1.reshape(-1, rows_Hn1.shape[-1]), cols_Hn2.reshape(-1, cols_Hn2.shape[-1])
    return SubkeyUsage(
        row_fraction_used=float((rows_Hn1 > 0).double().mean()),
        col_fraction_used=float((cols_Hn2 > 0).double().mean()),
        row_max_violation=float(_max_violation(rows_Hn1).max()),
        col_max_violation=float(_max_violation(cols_Hn2).max()),
    )
