"""Product-key retrieval, the pure-torch core (Lample et al. 2019, PKM; He 2024, PEER arXiv 2407.04153).

Experts sit on an n1 x n2 grid, expert id = row * n2 + col, with full key [c_row; c'_col]. The score of a query
q = [q1; q2] is q1 . c_row + q2 . c'_col, so the top-K over all N experts is contained in
topk(q1 . C) x topk(q2 . C') (a pair outside it is beaten by >= K pairs). Cost O((n1 + n2 + k'^2) D) per token and
head; nothing of size [T, N] is ever built.

One implementation for training and export: the Megatron layers (``layers/product_key_router.py``,
``layers/peer.py``, through ``kernels/product_keys.py``) use these functions, and the Hugging Face export copies
this file unchanged next to the remote-code model (``checkpoint/remote_code/``). So it imports torch and the
standard library only, and never another module of this package.

Legend: T tokens, H heads, K top-k, k' sub-key top-k (each side keeps min(k', n side): k1 rows, k2 columns),
C = k1*k2 candidate pairs, n1 / n2 sub-keys per row / column side (n for a square grid), N = n1*n2 experts,
D d_key (D2 = D/2, the sub-key width).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor
SubKeys = Tensor | tuple[Tensor, Tensor]

def num_experts_to_grid(num_experts: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """(n1, n2) with n1 * n2 == num_experts: the square root, or ``grid`` where one is given."""
    if grid is not None:
        n1, n2 = grid
        if n1 < 1 or n2 < 1 or n1 * n2 != num_experts:
            raise ValueError(f"grid {tuple(grid)} holds {n1 * n2} experts, not num_experts={num_experts}; "
                             f"fix: pass a grid (n1, n2) with n1 * n2 == {num_experts}")
        return n1, n2
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1; fix: use n*n experts, e.g. {64 * 64}")
    n = math.isqrt(num_experts)
    if n * n != num_experts:
        lo, hi = n * n, (n + 1) ** 2
        raise ValueError(f"num_experts={num_experts} is not a perfect square, so no n x n product-key grid exists; "
                         f"fix: use {lo} or {hi} experts, or pass grid=(n1, n2) with n1 * n2 == {num_experts}")
    return n, n


def _split_subkeys(subkeys: SubKeys) -> tuple[Tensor, Tensor]:
    """Row and column sub-keys, each [H, n, D2] (per head) or [n, D2] (shared)."""
    if isinstance(subkeys, (tuple, list)):
        if len(subkeys) != 2:
            raise ValueError(f"rectangular sub-keys must be a pair (row_keys, col_keys), got {len(subkeys)} tensors")
        rows, cols = subkeys
        if rows.dim() != cols.dim() or rows.dim() not in (2, 3):
            raise ValueError(f"row_keys {tuple(rows.shape)} and col_keys {tuple(cols.shape)} must both be "
                             "[H, n, D/2] (per head) or both [n, D/2] (shared)")
        return rows, cols
    if subkeys.dim() == 4 and subkeys.shape[1] == 2:
        return subkeys[:, 0], subkeys[:, 1]
    if subkeys.dim() == 3 and subkeys.shape[0] == 2:
        return subkeys[0], subkeys[1]
    raise ValueError(f"subkeys of shape {tuple(subkeys.shape)}: expected [H, 2, n, D/2] (per head), [2, n, D/2] "
                     "(shared), or a pair (row_keys, col_keys) for a rectangular grid")


def _validate(q_THD: Tensor, rows: Tensor, cols: Tensor, k: int, subkey_topk: int | None) -> tuple[int, int]:
    """Checks shapes, dtypes and exactness; returns the sub-keys kept per side (k'_1, k'_2)."""
    if q_THD.dim() != 3:
        raise ValueError(f"queries of shape {tuple(q_THD.shape)}: expected [T, H, D]; fix: reshape to [tokens, heads, d_key]")
    _, heads, d_key = q_THD.shape
    if d_key % 2:
        raise ValueError(f"d_key={d_key} is odd; the query splits into two halves of d_key/2; fix: use an even d_key")
    for side, keys in (("row", rows), ("column", cols)):
        if keys.shape[-1] != d_key // 2:
            raise ValueError(f"{side} sub-keys {tuple(keys.shape)} have width {keys.shape[-1]}, queries need "
                             f"d_key/2 = {d_key // 2}; fix: make sub-keys [.., n, {d_key // 2}] or queries d_key={2 * keys.shape[-1]}")
        if keys.dim() == 3 and keys.shape[0] != heads:
            raise ValueError(f"{side} sub-keys {tuple(keys.shape)} are per head for {keys.shape[0]} heads, queries "
                             f"{tuple(q_THD.shape)} have H={heads}; fix: one sub-key table per head, or shared [n, D/2]")
        if keys.dtype != q_THD.dtype:
            raise ValueError(f"{side} sub-keys are {keys.dtype}, queries {q_THD.dtype}; fix: cast both to one dtype")
    n1, n2 = rows.shape[-2], cols.shape[-2]
    if not 1 <= k <= n1 * n2:
        raise ValueError(f"k={k} must be in [1, N] with N = n1*n2 = {n1}*{n2} = {n1 * n2}; fix: choose 1 <= k <= {n1 * n2}")
    kp = k if subkey_topk is None else subkey_topk
    # Exact iff each side keeps min(k, n_side) sub-keys: a pair in the top-k ranks within the top k of its row
    # and of its column, and within its side's n. So k > n works with every sub-key of a side kept.
    need = min(k, max(n1, n2))
    if kp < need:
        raise ValueError(f"subkey_topk={kp} < {need} = min(k={k}, n={max(n1, n2)}): the product-key top-k is exact "
                         f"only if each side keeps >= min(k, n) sub-keys; fix: subkey_topk >= {need}, or None (= k)")
    if kp > k and kp > max(n1, n2):
        raise ValueError(f"subkey_topk={kp} exceeds the sub-keys per side (n1={n1}, n2={n2}); fix: subkey_topk "
                         f"<= {max(k, n1, n2)} (each side keeps min(subkey_topk, n) sub-keys), or None (= k)")
    return min(kp, n1), min(kp, n2)


def _half_scores_HTn(q_THD2: Tensor, keys: Tensor) -> Tensor:
    """q_half . key for every sub-key; keys [H, n, D2] (per head: scores in bmm's own [H, T, n]
    layout) or [n, D2] (shared: [T, H, n])."""
    if keys.dim() == 2:
        return q_THD2 @ keys.t()
    return torch.bmm(q_THD2.transpose(0, 1), keys.transpose(1, 2))  # [H,T,D2] @ [H,D2,n]


def _half_scores(q_THD2: Tensor, keys: Tensor) -> Tensor:
    """q_half . key for every sub-key: [T, H, n] (a view of ``_half_scores_HTn`` per head)."""
    scores = _half_scores_HTn(q_THD2, keys)
    return scores if keys.dim() == 2 else scores.transpose(0, 1)


def product_key_half_scores(queries_THD: Tensor, subkeys: SubKeys) -> tuple[Tensor, Tensor]:
    """The two halves' scores against every sub-key: a_THn1 = q1 . C_row, b_THn2 = q2 . C_col.

    The full score of expert (i, j) is a[i] + b[j], so anything separable over the grid (the
    log-partition function, marginals) is computed from these in O(n1 + n2) per token and head.
    Shapes and validation as in :func:`product_key_topk` (k is not involved here).
    """
    rows, cols = _split_subkeys(subkeys)
    _validate(queries_THD, rows, cols, 1, None)
    q1_THD2, q2_THD2 = queries_THD.chunk(2, dim=-1)
    return _half_scores(q1_THD2, rows), _half_scores(q2_THD2, cols)


def topk_from_half_scores(
    a_THn1: Tensor, b_THn2: Tensor, k: int, *, subkey_topk: int | None = None, expert_bias_HN: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k of a[i] + b[j] over the n1 x n2 grid: scores_THK sorted descending, ids = i * n2 + j.

    Each side keeps min(subkey_topk or k, n) candidates (``subkey_topk`` >= k, as validated by
    :func:`product_key_topk`); differentiable with respect to a and b. With ``expert_bias_HN`` (one value
    per head and expert, id = i * n2 + j) the k1 x k2 candidate pairs are ranked by a_i + b_j + bias_ij:
    the top-k over the candidate grid, not over all N (see :func:`_combine_candidates`).
    """
    n1, n2 = a_THn1.shape[-1], b_THn2.shape[-1]
    kp = k if subkey_topk is None else subkey_topk
    k1, k2 = min(kp, n1), min(kp, n2)
    a_THk1, row_THk1 = torch.topk(a_THn1, k1, dim=-1, sorted=True)
    b_THk2, col_THk2 = torch.topk(b_THn2, k2, dim=-1, sorted=True)
    return _combine_candidates(a_THk1, row_THk1, b_THk2, col_THk2, k, n2, expert_bias_HN=expert_bias_HN)


def _combine_candidates(
    a_THk1: Tensor, row_THk1: Tensor, b_THk2: Tensor, col_THk2: Tensor, k: int, n2: int, *,
    expert_bias_HN: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k of the k1 x k2 candidate sums a_i + b_j: scores_THK and ids = row * n2 + col.

    ``expert_bias_HN`` [H, N] adds bias_ij to candidate (i, j) of each head before the top-k: a gather of
    C values per token and head, so the cost stays O(k'^2). It can only re-rank pairs
    inside the candidate grid (an expert whose row or column is not among the k' best of its side is never
    reached), so the selection is the exact top-k of a + b + bias over that grid, not over all N; the
    returned scores then include the bias (callers wanting unbiased scores re-gather a and b by id).
    """
    k2 = b_THk2.shape[-1]
    # topk's backward scatters gradients back into a and b, hence into q, C and C'.
    cand_THC = (a_THk1.unsqueeze(-1) + b_THk2.unsqueeze(-2)).flatten(-2)
    if expert_bias_HN is not None:
        ids_THC = (row_THk1.unsqueeze(-1) * n2 + col_THk2.unsqueeze(-2)).flatten(-2)
        # Indexing [H, N] by (head, id) reads only C values per token and head; nothing [T, H, N] is built.
        heads_1H1 = torch.arange(ids_THC.shape[1], device=ids_THC.device).view(1, -1, 1)
        cand_THC = cand_THC + expert_bias_HN.to(cand_THC.dtype)[heads_1H1, ids_THC]
    scores_THK, flat_THK = torch.topk(cand_THC, k, dim=-1, sorted=True)
    rows_THK = torch.gather(row_THk1, -1, torch.div(flat_THK, k2, rounding_mode="floor"))
    cols_THK = torch.gather(col_THk2, -1, flat_THK % k2)
    return scores_THK, rows_THK * n2 + cols_THK


def product_key_topk_reference(queries_THD: Tensor, subkeys: SubKeys, k: int, *, subkey_topk: int | None = None) -> tuple[Tensor, Tensor]:
    """Brute force over all N full keys [c_row; c'_col] (the semantics; builds [T, H, N], small N only).

    Same signature and validation as :func:`product_key_topk`; ``subkey_topk`` is validated, not used.
    """
    rows, cols = _split_subkeys(subkeys)
    _validate(queries_THD, rows, cols, k, subkey_topk)
    n1, n2 = rows.shape[-2], cols.shape[-2]
    shared = rows.dim() == 2
    if shared:
        rows, cols = rows.unsqueeze(0), cols.unsqueeze(0)
    lead = rows.shape[0]
    keys_HND = torch.cat([rows.unsqueeze(2).expand(lead, n1, n2, -1), cols.unsqueeze(1).expand(lead, n1, n2, -1)], dim=-1)
    keys_HND = keys_HND.reshape(lead, n1 * n2, -1)
    scores_THN = torch.einsum("thd,hnd->thn", queries_THD, keys_HND.expand(queries_THD.shape[1], -1, -1) if shared else keys_HND)
    scores_THK, ids_THK = torch.topk(scores_THN, k, dim=-1, sorted=True)
    return scores_THK, ids_THK


# -- the product-key router's selection and gates (layers/product_key_router.py) ------------------------------


def product_key_log_partition(a_THn1: Tensor, b_THn2: Tensor) -> Tensor:
    """logZ_T = log sum over all heads and grid cells of exp(a_h,i + b_h,j), in O(n1 + n2)."""
    return torch.logsumexp(torch.logsumexp(a_THn1, -1) + torch.logsumexp(b_THn2, -1), dim=-1)


def biased_topk_from_half_scores(
    a_THn1: Tensor, b_THn2: Tensor, k: int, *, subkey_topk: int | None = None,
    row_bias_Hn1: Tensor | None = None, col_bias_Hn2: Tensor | None = None, expert_bias_HN: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Each head's exact top-k in its own n1 x n2 grid: (scores_THk, local ids_THk = row * n2 + col).

    With selection biases (auxiliary-loss-free balancing) the experts are chosen on biased scores and the
    scores returned are the unbiased a_i + b_j of the chosen experts, which the gates use. Separable biases
    (row_bias_Hn1 and col_bias_Hn2, both given) shift the half scores, a + row_bias and b + col_bias, and
    the search stays exact for those. A per-expert bias (``expert_bias_HN`` [H, n1*n2]) is added when the
    k1 x k2 candidate pairs of the (biased) half scores are combined: the selection is then the exact
    top-k of the fully biased score over that candidate grid, not over all N."""
    if row_bias_Hn1 is None and expert_bias_HN is None:
        return topk_from_half_scores(a_THn1, b_THn2, k, subkey_topk=subkey_topk)
    with torch.no_grad():
        sel_a_THn1, sel_b_THn2 = a_THn1, b_THn2
        if row_bias_Hn1 is not None:
            sel_a_THn1, sel_b_THn2 = a_THn1 + row_bias_Hn1.to(a_THn1.dtype), b_THn2 + col_bias_Hn2.to(b_THn2.dtype)
        _, local_THk = topk_from_half_scores(
            sel_a_THn1, sel_b_THn2, k, subkey_topk=subkey_topk, expert_bias_HN=expert_bias_HN,
        )
    n2 = b_THn2.shape[-1]
    rows_THk, cols_THk = torch.div(local_THk, n2, rounding_mode="floor"), local_THk % n2
    return torch.gather(a_THn1, -1, rows_THk) + torch.gather(b_THn2, -1, cols_THk), local_THk


def pooled_expert_ids(local_THk: Tensor, pool_size: int) -> Tensor:
    """Global expert ids [T, H*k] of per-head local ids: head h owns experts [h*pool, (h+1)*pool)."""
    T, H = local_THk.shape[:2]
    offsets_H1 = torch.arange(H, device=local_THk.device).view(H, 1) * pool_size
    return (local_THk + offsets_H1).reshape(T, -1)


def router_gates(
    logits_TK: Tensor, *, score_function: str, pre_softmax: bool, topk: int,
    scaling_factor: float | None = None, logz_T: Tensor | None = None,
) -> Tensor:
    """Megatron's gate functions over each token's selected logits, in fp32 (``topk_routing_with_score_function``):
    softmax over them, or with ``pre_softmax`` the full softmax over all experts (needs ``logz_T``, the
    log-partition), or sigmoid normalised over them when topk > 1; then times ``scaling_factor`` when set."""
    if score_function == "softmax":
        if pre_softmax:
            probs_TK = torch.exp(logits_TK.float() - logz_T.float().unsqueeze(-1))
        else:
            probs_TK = torch.softmax(logits_TK, dim=-1, dtype=torch.float32)
    elif score_function == "sigmoid":
        probs_TK = torch.sigmoid(logits_TK.float())
        if topk > 1:
            probs_TK = probs_TK / (probs_TK.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        raise ValueError(f"score function {score_function!r} is unknown for product keys; choose softmax or sigmoid")
    if scaling_factor:
        probs_TK = probs_TK * scaling_factor
    return probs_TK
