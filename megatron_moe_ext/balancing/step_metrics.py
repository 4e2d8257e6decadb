"""One training step's load metrics as 0-dim tensors, for Megatron's MoE metrics tracker.

The same quantities as ``metrics.py`` (which returns Python floats, a host sync each), computed on
the counts' device without reading them back, so a router can record them every step: O(N) work
on the step's all-reduced counts, nothing per token. Where ``metrics.py`` gives NaN (no load at
all), these give 0, so one empty layer cannot turn the layer mean into NaN; it cannot happen for
a layer that routed tokens.

Legend: N experts, D EP ranks, H product-key heads, n1 x n2 grid per head.
"""

from __future__ import annotations

import math

import torch

from megatron_moe_ext.balancing.metrics import UsageWindow

Tensor = torch.Tensor


def _max_violation(load: Tensor) -> Tensor:
    """(max - mean) / mean along the last dim, 0 where the mean is 0 (fp64; integer loads are summed exactly)."""
    mean = load.sum(-1).to(torch.float64) / load.shape[-1]
    safe = torch.where(mean > 0, mean, torch.ones_like(mean))
    return torch.where(mean > 0, (load.amax(-1).to(torch.float64) - mean) / safe, torch.zeros_like(mean))


def _normalized_entropy(load_N: Tensor) -> Tensor:
    """H(p) / log N with p = load / total, 0 without load.

    Integer counts (the normal case) take p and p log p in fp32 (relative error ~1e-7 per term, every term of
    one sign, so no cancellation) summed in fp64: at N = 1M an fp64 pass cost 27 ms of CPU per layer and step,
    this 6 ms. Float loads stay fp64.
    """
    total = load_N.sum().to(torch.float64)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    p_N = load_N / safe if load_N.is_floating_point() else load_N.float() / safe.float()
    h = -torch.special.xlogy(p_N, p_N).sum(dtype=torch.float64)
    return h / math.log(load_N.shape[0]) if load_N.shape[0] > 1 else torch.ones_like(h)


def step_load_metrics(
    counts_N: Tensor, *, ep_size: int = 1, grid: tuple[int, int, int] | None = None, num_real: int | None = None
) -> dict[str, Tensor]:
    """Metrics of one step's loads (selections per expert, all-reduced over the data-parallel ranks).

    - ``max_violation``: MaxVio (Wang et al. 2024, arXiv 2408.15664), (max - mean) / mean load.
    - ``load_entropy``: entropy of the load distribution / log N (1 = uniform).
    - with ``ep_size`` > 1 (Megatron's contiguous placement, N/D experts per EP rank):
      ``max_violation_ep_rank_max``, the worst EP rank's MaxVio among its own experts, and
      ``device_max_violation``, the MaxVio of the per-rank loads (the straggler's excess).
    - with ``grid`` = (H, n1, n2) (product keys, expert id = h*n1*n2 + row*n2 + col): ``pk_rows_used``
      and ``pk_cols_used``, the fraction of all heads' rows (columns) selected at least once.
    - ``num_real``: with null experts (``layers/null_experts.py``) the first ``num_real`` entries are the real
      experts; MaxVio, entropy and the grid metrics cover all entries (null experts are balanced like
      experts), the EP metrics the real experts only (null experts live on no EP rank).
    Returns fp32 0-dim tensors (sums exact or fp64: N = 1M needs more than fp32's 24 bits).
    """
    if counts_N.dim() != 1 or counts_N.numel() == 0:
        raise ValueError(f"counts_N of shape {tuple(counts_N.shape)}: expected [N] selections per expert")
    # Integer counts stay integers (exact sums, one cheap pass each); float loads are taken in fp64.
    load_N = counts_N if not counts_N.is_floating_point() else counts_N.to(torch.float64)
    N = load_N.shape[0]
    out = {"max_violation": _max_violation(load_N), "load_entropy": _normalized_entropy(load_N)}
    if ep_size > 1:
        real = N if num_real is None else num_real
        if real % ep_size or real > N:
            raise ValueError(f"ep_size={ep_size} does not divide the {real} real experts (of N={N}); fix: an ep_size "
                             f"among the divisors of {real}")
        load_DN = load_N[:real].reshape(ep_size, real // ep_size)
        out["max_violation_ep_rank_max"] = _max_violation(load_DN).amax()
        out["device_max_violation"] = _max_violation(load_DN.sum(-1))
    if grid is not None:
        H, n1, n2 = grid
        if H * n1 * n2 != N:
            raise ValueError(f"grid {grid} holds {H * n1 * n2} experts, not N={N}; fix: pass (heads, rows, cols)")
        load_Hn1n2 = load_N.view(H, n1, n2)
        out["pk_rows_used"] = (load_Hn1n2.sum(-1) > 0).to(torch.float64).mean()
        out["pk_cols_used"] = (load_Hn1n2.sum(-2) > 0).to(torch.float64).mean()
    return {name: value.float() for name, value in out.items()}


def usage_fraction(window: UsageWindow, step: int) -> Tensor:
    """``window.fraction_used(step)`` as a 0-dim fp32 tensor, without a host sync."""
    return (window.last_used_N > step - window.window).sum().float() / window.num_experts
