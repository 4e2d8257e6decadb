"""Product-key top-k (Lample et al. 2019, PKM; He 2024, PEER arXiv 2407.04153): the fast core and its reference.

Experts sit on an n1 x n2 grid, expert id = row * n2 + col, with full key [c_row; c'_col]. The score of a query
q = [q1; q2] is q1 . c_row + q2 . c'_col, so the top-K over all N experts is contained in
topk(q1 . C) x topk(q2 . C') (a pair outside it is beaten by >= K pairs). Cost O((n1 + n2 + k'^2) D) per token and
head; nothing of size [T, N] is ever built. Kernels see tensors, never a config.

The pure math (half scores, the exact top-k from them, the brute-force reference) lives in
``kernels/product_key_core.py``, which the Hugging Face export also ships; this module adds the training path
(``product_key_topk``: a sparse backward and the compiled CPU scan; ``product_key_topk_with_candidates`` also
returns each side's kept sub-keys, for the PEER balance loss) and re-exports the core's names.

Legend: T tokens, H heads, K top-k, k' sub-key top-k (each side keeps min(k', n side): k1 rows, k2 columns),
n1 / n2 sub-keys per row / column side (n for a square grid), N = n1*n2 experts, D d_key (D2 = D/2, the sub-key width).
"""

from __future__ import annotations

import torch

from megatron_moe_ext.kernels.product_key_core import (  # noqa: F401  (re-exported: the public names of this module)
    SubKeys,
    Tensor,
    _combine_candidates,
    _half_scores,
    _half_scores_HTn,
    _split_subkeys,
    _validate,
    num_experts_to_grid,
    product_key_half_scores,
    product_key_topk_reference,
    topk_from_half_scores,
)


class _HalfTopK(torch.autograd.Function):
    """Top-k' of q_half . keys over one side's n sub-keys, with a sparse backward: only the k'
    kept scores carry gradient, so dq = sum_j g_j c_idx(j) and dC[idx(j)] += g_j q cost
    O(k' D2) per token and head instead of the O(n D2) of differentiating the dense scores."""

    @staticmethod
    def forward(ctx, q_THD2, keys, kp):  # type: ignore[override]
        if q_THD2.device.type == "cpu" and q_THD2.dtype == torch.float32:
            from megatron_moe_ext.kernels.peer_cpu import row_topk  # compiled scan; torch.topk without a compiler

            # Per-head scores come out of bmm as [H, T, n]: select there (contiguous rows), then
            # transpose the small [H, T, k'] results instead of the scores.
            scores = _half_scores_HTn(q_THD2, keys)
            vals, idx = row_topk(scores, kp)
            vals_THk, idx_THk = (vals, idx) if keys.dim() == 2 else (vals.transpose(0, 1), idx.transpose(0, 1))
        else:
            vals_THk, idx_THk = torch.topk(_half_scores(q_THD2, keys), kp, dim=-1, sorted=True)
        ctx.save_for_backward(q_THD2, keys, idx_THk)
        ctx.mark_non_differentiable(idx_THk)
        return vals_THk, idx_THk

    @staticmethod
    def backward(ctx, g_THk, _):  # type: ignore[override]
        q_THD2, keys, idx_THk = ctx.saved_tensors
        T, H, kp = idx_THk.shape
        n, D2 = keys.shape[-2], keys.shape[-1]
        # Rows of the flattened [(H,) n, D2] key table each kept score came from.
        if keys.dim() == 3:
            rows_THk = idx_THk + (torch.arange(H, device=idx_THk.device) * n).view(1, H, 1)
        else:
            rows_THk = idx_THk
        flat_keys = keys.reshape(-1, D2)
        g_THk = g_THk.to(q_THD2.dtype)
        dq = None
        if ctx.needs_input_grad[0]:
            sel_THkD2 = flat_keys.index_select(0, rows_THk.reshape(-1)).view(T, H, kp, D2)
            dq = torch.matmul(g_THk.unsqueeze(-2), sel_THkD2).squeeze(-2)
        dkeys = None
        if ctx.needs_input_grad[1]:
            contrib = (g_THk.unsqueeze(-1) * q_THD2.unsqueeze(-2)).reshape(-1, D2)
            dkeys = torch.zeros_like(flat_keys).index_add_(0, rows_THk.reshape(-1), contrib).view_as(keys)
        return dq, dkeys, None


Candidates = tuple[Tensor, Tensor, Tensor, Tensor]


def product_key_topk_with_candidates(
    queries_THD: Tensor, subkeys: SubKeys, k: int, *, subkey_topk: int | None = None
) -> tuple[Tensor, Tensor, Candidates]:
    """:func:`product_key_topk` plus each side's kept sub-keys: ``(scores_THK, ids_THK, candidates)``.

    candidates = (a_THk1, row_THk1, b_THk2, col_THk2): per side the top-k' half scores (sorted descending,
    differentiable through the same sparse backward as the scores) and their sub-key indices (int64, in
    [0, n1) / [0, n2)). Retrieval computes them anyway; a balance loss built on them adds its gradient to
    the k' kept values, so it costs O(k') per token and head instead of a dense pass over all n sub-keys.
    """
    rows, cols = _split_subkeys(subkeys)
    k1, k2 = _validate(queries_THD, rows, cols, k, subkey_topk)
    q1_THD2, q2_THD2 = queries_THD.chunk(2, dim=-1)
    a_THk1, row_THk1 = _HalfTopK.apply(q1_THD2, rows, k1)
    b_THk2, col_THk2 = _HalfTopK.apply(q2_THD2, cols, k2)
    scores_THK, ids_THK = _combine_candidates(a_THk1, row_THk1, b_THk2, col_THk2, k, cols.shape[-2])
    return scores_THK, ids_THK, (a_THk1, row_THk1, b_THk2, col_THk2)


def product_key_topk(queries_THD: Tensor, subkeys: SubKeys, k: int, *, subkey_topk: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-k over the n1*n2 product keys in O((n1 + n2 + k'^2) D) per token and head.

    queries_THD [T, H, D]: the first D/2 score against the row sub-keys, the last D/2 against the column ones.
    subkeys: [H, 2, n, D/2] (per head), [2, n, D/2] (shared by all heads), or a pair (row_keys, col_keys) of
    [H, n1, D/2] / [H, n2, D/2] or [n1, D/2] / [n2, D/2] for a rectangular grid. ``subkey_topk`` (k', default k,
    must be >= k for exactness) sub-keys are kept per side, at most that side's n.
    Returns scores_THK sorted descending (differentiable w.r.t. queries and sub-keys, with a sparse
    backward through the kept sub-keys only; dtype of the inputs) and ids_THK int64 = row * n2 + col.
    """
    scores_THK, ids_THK, _ = product_key_topk_with_candidates(queries_THD, subkeys, k, subkey_topk=subkey_topk)
    return scores_THK, ids_THK
