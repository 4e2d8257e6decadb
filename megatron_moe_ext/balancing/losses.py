"""Load-balancing losses for routed experts: pure functions, tensors in, a 0-dim tensor out.

Every loss here has the Switch form L = coeff * sum_x f_x * P_x over some bins x (experts, EP devices,
product-key rows and columns). f_x is the load of bin x from the hard routing decisions (counts, no
gradient), normalised so that f_x = 1 for every x at perfect balance; P_x is the router's mean soft score
mass on x (carries the gradient) and sums to 1 over x. So every loss equals ``coeff`` exactly at perfect
balance whatever the number of experts, top-k, devices or grid, which is what lets one coefficient serve
every granularity (DeepSeekMoE, arXiv 2401.06066). Its gradient is another matter:
:func:`coefficient_for_granularity`.

No process groups here: callers count selections (:func:`expert_counts`, :func:`subkey_counts`), all-reduce
the counts over the group their variant needs, and pass them in. Attaching a loss to backward (Megatron's
``MoEAuxLossAutoScaler``) is a separate step of the caller.

Legend: T tokens held by this rank, S sequence length, B sequences, N routed experts, K routed top-k per
token, D EP ranks (devices, ep_size), H product-key heads, n1 x n2 sub-key grid per head, k top-k per head
(K = H * k), k1 / k2 candidate sub-keys a product-key search keeps per token, head and side (c: either),
G granularity.
"""

from __future__ import annotations

import math

import torch

from megatron_moe_ext.settings.balancing import DEFAULT_COEFF_POLICY, GRANULARITY_POLICIES

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# Validation and shared pieces
# ----------------------------------------------------------------------------------------------------------


def _check_coeff(coeff: float) -> None:
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff) or coeff < 0:
        raise ValueError(f"coeff={coeff!r} must be a finite number >= 0; fix: pass the loss weight, e.g. 1e-2 "
                         "(0 turns the loss off)")


def _check_scores(scores: Tensor, dims: int, name: str, layout: str) -> None:
    if scores.dim() != dims or not scores.is_floating_point():
        raise ValueError(f"{name} of shape {tuple(scores.shape)} and dtype {scores.dtype}: expected a floating "
                         f"tensor {layout}; fix: pass the router's normalised scores as {layout}")


def _check_topk(topk: int, n: int, what: str = "N") -> None:
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= n:
        raise ValueError(f"topk={topk!r} must be an int in [1, {what}] with {what}={n}; fix: pass the number of "
                         f"experts each token selects, at most {n}")


def _check_num_tokens(num_tokens: int | Tensor, name: str = "num_tokens") -> None:
    # A tensor (an all-reduced count) is taken as is: reading its value would cost a host sync every step.
    if isinstance(num_tokens, Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"{name} is a tensor of shape {tuple(num_tokens.shape)}; fix: pass one count (int or 0-dim)")
        return
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"{name}={num_tokens!r} must be an int >= 1 (or a 0-dim tensor); fix: pass the number of "
                         "valid tokens the counts were taken over")


def _check_valid(valid: Tensor | None, shape: tuple[int, ...], name: str) -> None:
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != shape):
        raise ValueError(f"{name} of shape {tuple(valid.shape)} and dtype {valid.dtype}: expected bool {list(shape)} "
                         f"(True = real token, False = padding); fix: pass ~padding_mask reshaped to {list(shape)}")


def _check_counts(counts: Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(counts.shape) != shape:
        raise ValueError(f"{name} of shape {tuple(counts.shape)} does not match the scores: expected {list(shape)}; "
                         f"fix: count selections per expert over the same experts the scores cover")


def _check_ep_size(ep_size: int, num_experts: int) -> None:
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 2:
        raise ValueError(f"ep_size={ep_size!r}: a device-level loss needs >= 2 EP ranks (with one device it is the "
                         "constant coeff and has no gradient); fix: use expert_balance_loss, or pass ep_size >= 2")
    if num_experts % ep_size:
        raise ValueError(f"ep_size={ep_size} does not divide N={num_experts} experts; Megatron places N/ep_size "
                         f"experts contiguously on each EP rank; fix: an ep_size among the divisors of {num_experts}")


def _compute_dtype(t: Tensor) -> torch.dtype:
    # Half-precision sums over many tokens lose the balance signal; fp64 stays fp64 (gradcheck).
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _valid_sum(x: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """(sum over the leading token dim of the valid rows of x, number of valid rows as 0-dim float).

    ``where`` rather than a multiply: padding rows may hold inf/NaN and must give neither a value nor a gradient.
    """
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    if valid is None:
        return x.sum(0), torch.tensor(float(x.shape[0]), dtype=dtype, device=x.device)
    keep = valid.view(valid.shape + (1,) * (x.dim() - valid.dim()))
    return torch.where(keep, x, torch.zeros((), dtype=dtype, device=x.device)).sum(0), valid.sum().to(dtype)


def _load_fraction(counts: Tensor, bins: int, topk: int, num_tokens: int | Tensor, dtype: torch.dtype) -> Tensor:
    """f = bins / (topk * num_tokens) * counts: 1 for every bin at perfect balance."""
    if isinstance(num_tokens, Tensor):
        num_tokens = num_tokens.to(dtype=dtype, device=counts.device).clamp(min=1)
    return counts.to(dtype) * bins / (topk * num_tokens)


def _local_mean_scores(scores_TN: Tensor, valid_T: Tensor | None) -> Tensor:
    """P_N: mean router score of each expert over the valid local tokens (0 if there are none)."""
    sums_N, n_valid = _valid_sum(scores_TN, valid_T)
    return sums_N / n_valid.clamp(min=1)


def _check_expert_inputs(scores_TN: Tensor, counts_N: Tensor, num_tokens: int | Tensor, topk: int, coeff: float,
                         valid_T: Tensor | None) -> int:
    _check_coeff(coeff)
    _check_scores(scores_TN, 2, "scores_TN", "[T, N]")
    T, N = scores_TN.shape
    _check_counts(counts_N, (N,), "counts_N")
    _check_topk(topk, N)
    _check_num_tokens(num_tokens)
    _check_valid(valid_T, (T,), "valid_T")
    return N


def expert_counts(routing_map_TN: Tensor, *, valid_T: Tensor | None = None) -> Tensor:
    """counts_N (int64): how many valid tokens selected each expert; all-reduce it for the wider variants."""
    if routing_map_TN.dim() != 2 or routing_map_TN.dtype != torch.bool:
        raise ValueError(f"routing_map_TN of shape {tuple(routing_map_TN.shape)} and dtype {routing_map_TN.dtype}: "
                         "expected bool [T, N]; fix: pass the router's routing map")
    _check_valid(valid_T, (routing_map_TN.shape[0],), "valid_T")
    if valid_T is not None:
        routing_map_TN = routing_map_TN & valid_T.unsqueeze(-1)
    return routing_map_TN.sum(0)


# ----------------------------------------------------------------------------------------------------------
# Expert level: micro-batch, sequence, global batch
# ----------------------------------------------------------------------------------------------------------


def expert_balance_loss(scores_TN: Tensor, counts_N: Tensor, num_tokens: int | Tensor, topk: int, coeff: float,
                        *, valid_T: Tensor | None = None) -> Tensor:
    """Expert-level balance loss, granularity normalised (DeepSeekMoE, arXiv 2401.06066, eq. for L_ExpBal;
    the Switch Transformer aux loss, arXiv 2101.03961, and Megatron's ``aux_loss`` with the same normalisation):

        L = coeff * sum_i f_i * P_i,   f_i = N / (K * T) * count_i,   P_i = mean over valid local tokens of s_t,i

    with N routed experts, K = ``topk`` routed experts per token, T = ``num_tokens``. Since sum_i count_i = K*T
    and sum_i P_i = 1, L = coeff exactly at perfect balance (count_i = K*T/N) for any N and K. Shared experts
    are not routed, so they are simply not part of N or K (DeepSeekMoE's N' = mN - K_s, K' = mK - K_s: pass the
    routed counts only). Equal to Megatron's ``switch_load_balancing_loss_func`` when the counts and the scores
    cover the same tokens: there f_i = count_i/(K T), P_i = sum_t s_t,i / T and the factor N sits in front.

    scores_TN: the router's normalised scores over all N routed experts, rows summing to 1 (softmax, or
    sigmoid normalised per token); the gradient flows through them. counts_N: selections per expert counted
    over ``num_tokens`` tokens, possibly a larger token set than the local scores (then summed by the caller);
    padding tokens must not be counted. valid_T: bool, False for padding tokens, which then touch neither value
    nor gradient. Returns a 0-dim tensor in fp32 (fp64 for fp64 scores).

    Variants are choices of counts and token count, not separate functions:
    - per micro-batch (Megatron ``aux_loss``): counts of this micro-batch's tokens, all-reduced over the ranks
      that hold shards of the same tokens (TP with sequence parallelism, CP); num_tokens = their valid total.
    - per sequence (DeepSeek-V3's complementary sequence-wise loss): one call per sequence with that
      sequence's counts and length, averaged; :func:`sequence_balance_loss` does all sequences at once.
    - global batch (Qiu et al. 2025, arXiv 2501.11873; Megatron ``global_aux_loss``): counts all-reduced over
      the data-parallel group and summed over the micro-batches seen so far; num_tokens = the tokens they
      were counted over. P stays local. See :func:`global_batch_balance_loss` for the gradient scale.

    Gradient scale. P_i is the mean over *local* tokens, so this rank's loss estimates the loss of the whole
    batch and its gradient w.r.t. each local score is coeff * f_i / T_local, i.e. dp_size times the gradient of
    the global-batch loss when the local tokens are 1/dp_size of it. Megatron DDP then averages the router's
    gradient over the DP(xCP) ranks, which divides that factor back out: the result is exactly the global-batch
    gradient when every rank holds the same number of valid tokens. Megatron 0.19's ``global_aux_loss``
    instead divides the local score sum by the *global* token count (each rank's loss is a share f_global *
    P_local that sums, not averages, to the global loss), so after DDP averaging its gradient is 1/dp_size too
    small. With unequal padding across ranks use :func:`global_batch_balance_loss`, which is exact.
    """
    N = _check_expert_inputs(scores_TN, counts_N, num_tokens, topk, coeff, valid_T)
    P_N = _local_mean_scores(scores_TN, valid_T)
    return coeff * (_load_fraction(counts_N, N, topk, num_tokens, P_N.dtype) * P_N).sum()


def global_batch_balance_loss(scores_TN: Tensor, counts_N: Tensor, num_tokens: int | Tensor, topk: int,
                              coeff: float, *, group_tokens: int | Tensor, dp_size: int,
                              valid_T: Tensor | None = None) -> Tensor:
    """Global-batch expert balance loss (Qiu et al. 2025, arXiv 2501.11873) with its data-parallel gradient
    scale made explicit:

        L_r = coeff * dp_size * sum_i f_i * (sum over valid local tokens of s_t,i) / group_tokens

    with f_i = N / (K * num_tokens) * count_i from the global counts (all-reduced over DP, and accumulated over
    micro-batches where wanted), and ``group_tokens`` the valid tokens of *this* micro-batch summed over the
    ranks whose router gradients are combined (all-reduced valid count). Then sum_r L_r / dp_size is the
    loss of the whole micro-batch, and a gradient reducer that *averages* over ``dp_size`` ranks (Megatron
    DDP over the DP x CP group, without ``calculate_per_token_loss``) yields exactly its gradient, whatever
    each rank's padding. Each rank's value is also an estimate of the global loss (exact on average over
    ranks), so it can be logged as is.

    dp_size=1 reproduces Megatron 0.19's ``global_aux_loss`` share, whose DDP-averaged gradient is 1/dp_size
    too small; dp_size=1 with group_tokens = local valid tokens is :func:`expert_balance_loss`. For ranks whose
    gradients are *summed* (TP with sequence parallelism), count their tokens in ``group_tokens`` but not in
    ``dp_size``. Micro-batches: scale each micro-batch's loss by 1/num_microbatches like the main loss.
    Shapes, dtypes and the balance value coeff as in :func:`expert_balance_loss`.
    """
    N = _check_expert_inputs(scores_TN, counts_N, num_tokens, topk, coeff, valid_T)
    _check_num_tokens(group_tokens, "group_tokens")
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size={dp_size!r} must be an int >= 1; fix: pass the number of ranks the router's "
                         "gradient is averaged over (Megatron: the DP x CP group size)")
    sums_N, _ = _valid_sum(scores_TN, valid_T)
    if isinstance(group_tokens, Tensor):
        group_tokens = group_tokens.to(dtype=sums_N.dtype, device=sums_N.device).clamp(min=1)
    P_N = sums_N * dp_size / group_tokens
    return coeff * (_load_fraction(counts_N, N, topk, num_tokens, P_N.dtype) * P_N).sum()


def sequence_counts(routing_map_SBN: Tensor, *, valid_SB: Tensor | None = None) -> Tensor:
    """counts_BN (int64): selections per sequence and expert, padding excluded (Megatron's [S, B] token order)."""
    if routing_map_SBN.dim() != 3 or routing_map_SBN.dtype != torch.bool:
        raise ValueError(f"routing_map_SBN of shape {tuple(routing_map_SBN.shape)} and dtype {routing_map_SBN.dtype}: "
                         "expected bool [S, B, N]; fix: routing_map_TN.view(S, B, N) (Megatron's tokens are s-major)")
    _check_valid(valid_SB, tuple(routing_map_SBN.shape[:2]), "valid_SB")
    if valid_SB is not None:
        routing_map_SBN = routing_map_SBN & valid_SB.unsqueeze(-1)
    return routing_map_SBN.sum(0)


def sequence_balance_loss(scores_SBN: Tensor, counts_BN: Tensor, topk: int, coeff: float, *,
                          valid_SB: Tensor | None = None, tokens_B: Tensor | None = None) -> Tensor:
    """Sequence-wise balance loss (DeepSeek-V3, arXiv 2412.19437, eq. 17-20; Megatron ``seq_aux_loss``):
    the expert-level loss of each sequence, averaged over the sequences that hold a valid token:

        L = coeff * mean_b sum_i f_b,i * P_b,i,   f_b,i = N / (K * T_b) * count_b,i,   P_b,i = mean_t s_t,b,i

    T_b = ``tokens_B[b]`` (default: the valid tokens of sequence b here). Equals coeff at perfect balance within
    every sequence. scores_SBN: normalised router scores in Megatron's [S, B] token order
    (``scores_TN.view(S, B, N)``); counts_BN from :func:`sequence_counts`, all-reduced with tokens_B over the
    ranks holding shards of the same sequences (TP with sequence parallelism, CP), where P stays local as in
    :func:`expert_balance_loss`. Returns a 0-dim tensor.
    """
    _check_coeff(coeff)
    _check_scores(scores_SBN, 3, "scores_SBN", "[S, B, N]")
    S, B, N = scores_SBN.shape
    _check_counts(counts_BN, (B, N), "counts_BN")
    _check_topk(topk, N)
    _check_valid(valid_SB, (S, B), "valid_SB")
    if tokens_B is not None and tuple(tokens_B.shape) != (B,):
        raise ValueError(f"tokens_B of shape {tuple(tokens_B.shape)}: expected [{B}], the valid tokens of each "
                         "sequence; fix: valid_SB.sum(0), all-reduced like counts_BN")
    sums_BN, _ = _valid_sum(scores_SBN, valid_SB)
    dtype = sums_BN.dtype
    local_B = (valid_SB.sum(0) if valid_SB is not None else torch.full((B,), S, device=sums_BN.device)).to(dtype)
    total_B = local_B if tokens_B is None else tokens_B.to(dtype=dtype, device=sums_BN.device)
    f_BN = counts_BN.to(dtype) * N / (topk * total_B.clamp(min=1).unsqueeze(-1))
    loss_B = (f_BN * sums_BN / local_B.clamp(min=1).unsqueeze(-1)).sum(-1)
    # All-padding sequences carry no routing decision: they leave the mean rather than pull it towards 0.
    return coeff * loss_B.sum() / (local_B > 0).sum().clamp(min=1).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Device and communication level (DeepSeek-V2)
# ----------------------------------------------------------------------------------------------------------


def device_balance_loss(scores_TN: Tensor, counts_N: Tensor, num_tokens: int | Tensor, topk: int, ep_size: int,
                        coeff: float, *, valid_T: Tensor | None = None) -> Tensor:
    """Device-level balance loss (DeepSeek-V2, arXiv 2405.04434, eq. 26-28; DeepSeekMoE arXiv 2401.06066):

        L = coeff * sum_d f'_d * P'_d,   f'_d = mean of f_i over the experts on device d,
                                          P'_d = sum of P_i over the experts on device d

    with f_i, P_i as in :func:`expert_balance_loss`, and Megatron's placement: EP rank d holds experts
    [d*N/D, (d+1)*N/D). Balances the compute per EP rank while letting experts of one rank specialise
    unevenly. Equals coeff at perfect balance, and :func:`expert_balance_loss` when every rank holds one expert
    (D = N). ValueError for ep_size 1 (the loss would be the constant coeff) or ep_size not dividing N.
    Shapes and counts as in :func:`expert_balance_loss`; returns a 0-dim tensor.
    """
    N = _check_expert_inputs(scores_TN, counts_N, num_tokens, topk, coeff, valid_T)
    _check_ep_size(ep_size, N)
    P_N = _local_mean_scores(scores_TN, valid_T)
    f_N = _load_fraction(counts_N, N, topk, num_tokens, P_N.dtype)
    f_D = f_N.view(ep_size, N // ep_size).mean(-1)
    P_D = P_N.view(ep_size, N // ep_size).sum(-1)
    return coeff * (f_D * P_D).sum()


def device_token_counts(routing_map_TN: Tensor, ep_size: int, *, valid_T: Tensor | None = None) -> Tensor:
    """tokens_D (int64): valid tokens with at least one selected expert on each EP rank (what each rank receives)."""
    if routing_map_TN.dim() != 2 or routing_map_TN.dtype != torch.bool:
        raise ValueError(f"routing_map_TN of shape {tuple(routing_map_TN.shape)} and dtype {routing_map_TN.dtype}: "
                         "expected bool [T, N]; fix: pass the router's routing map")
    T, N = routing_map_TN.shape
    _check_ep_size(ep_size, N)
    _check_valid(valid_T, (T,), "valid_T")
    hits_TD = routing_map_TN.view(T, ep_size, N // ep_size).any(-1)
    if valid_T is not None:
        hits_TD = hits_TD & valid_T.unsqueeze(-1)
    return hits_TD.sum(0)


def expected_devices_per_token(num_experts: int, topk: int, ep_size: int) -> float:
    """E[distinct EP ranks a token reaches] when its top-k is a uniformly random K-subset of the N experts:
    D * (1 - C(N - N/D, K) / C(N, K)). Pass it as ``max_devices`` to make the communication loss equal coeff in
    expectation under unrestricted, uniformly random routing."""
    _check_topk(topk, num_experts)
    _check_ep_size(ep_size, num_experts)
    per = num_experts // ep_size
    miss = math.comb(num_experts - per, topk) / math.comb(num_experts, topk)  # P(no pick on a given device)
    return ep_size * (1.0 - miss)


def communication_balance_loss(scores_TN: Tensor, routing_map_TN: Tensor, ep_size: int, coeff: float, *,
                               max_devices: float | None = None, valid_T: Tensor | None = None) -> Tensor:
    """Communication-level balance loss (DeepSeek-V2, arXiv 2405.04434, eq. 29-31):

        L = coeff * sum_d f''_d * P''_d,   f''_d = D / (M * T) * (valid tokens with >= 1 selected expert on d),
                                            P''_d = sum of P_i over the experts on device d

    T = valid tokens here, P_i as in :func:`expert_balance_loss`, Megatron's contiguous placement. M =
    ``max_devices``, DeepSeek-V2's device limit (each token is sent to at most M ranks; 3 there). Default:
    min(K, D), K = the most experts any valid token selected (the router's top-k; read on the device, no sync).

    Value: sum_d f''_d = D * R / M with R = mean ranks reached per token. When every rank receives the same
    number of tokens, f''_d = R / M for every d and L = coeff * R / M for any scores (likewise for uniform
    P''_d = 1/D and any loads). So L equals coeff exactly at balanced rank loads when every token reaches M
    ranks on average; with the default M, when every token's top-k spreads over min(K, D) ranks
    (device-limited routing that fills its limit, or K >= D with every rank reached). Unrestricted random
    routing reaches fewer ranks (two picks can share one), so it sits below coeff, at R / min(K, D); pass
    ``max_devices=expected_devices_per_token(N, K, D)`` for a loss that is coeff in expectation there.

    The counts are this rank's: what it sends is what its dispatch communicates, so they are not all-reduced.
    scores_TN [T, N] normalised scores, routing_map_TN bool [T, N]. ValueError for ep_size 1 or not dividing N.
    """
    _check_coeff(coeff)
    _check_scores(scores_TN, 2, "scores_TN", "[T, N]")
    T, N = scores_TN.shape
    if tuple(routing_map_TN.shape) != (T, N) or routing_map_TN.dtype != torch.bool:
        raise ValueError(f"routing_map_TN of shape {tuple(routing_map_TN.shape)} and dtype {routing_map_TN.dtype}: "
                         f"expected bool {[T, N]} like scores_TN; fix: pass the router's routing map for the same tokens")
    _check_ep_size(ep_size, N)
    _check_valid(valid_T, (T,), "valid_T")
    if max_devices is not None and (isinstance(max_devices, bool) or not isinstance(max_devices, (int, float))
                                    or not 0 < max_devices <= ep_size):
        raise ValueError(f"max_devices={max_devices!r} must be a number in (0, ep_size={ep_size}]; fix: the "
                         "device limit of device-limited routing (e.g. 3), or None for min(topk, ep_size)")
    sums_N, n_valid = _valid_sum(scores_TN, valid_T)
    dtype = sums_N.dtype
    P_D = (sums_N / n_valid.clamp(min=1)).view(ep_size, N // ep_size).sum(-1)
    tokens_D = device_token_counts(routing_map_TN, ep_size, valid_T=valid_T).to(dtype)
    if max_devices is None:
        picks_T = routing_map_TN.sum(-1)
        if valid_T is not None:
            picks_T = torch.where(valid_T, picks_T, torch.zeros_like(picks_T))
        max_devices = picks_T.max().clamp(min=1, max=ep_size).to(dtype) if T else 1.0
    f_D = tokens_D * ep_size / (max_devices * n_valid.clamp(min=1))
    return coeff * (f_D * P_D).sum()


# ----------------------------------------------------------------------------------------------------------
# Product keys: sub-key marginals
# ----------------------------------------------------------------------------------------------------------


def subkey_counts(ids_THk: Tensor, n1: int, n2: int, *, valid_T: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(row_counts_Hn1, col_counts_Hn2), int64: selections of each head whose row (col) is i, padding excluded.

    ids_THk: each head's local expert ids, id = row * n2 + col in [0, n1*n2) (``topk_from_half_scores``).
    O(T*H*k). Reads ids.min()/max() once to refuse out-of-range ids (one host sync).
    """
    if ids_THk.dim() != 3 or ids_THk.is_floating_point() or ids_THk.dtype == torch.bool:
        raise ValueError(f"ids_THk of shape {tuple(ids_THk.shape)} and dtype {ids_THk.dtype}: expected integer "
                         "[T, H, k] per-head expert ids; fix: pass the ids from topk_from_half_scores")
    for name, n in (("n1", n1), ("n2", n2)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}={n!r} must be an int >= 1; fix: pass the grid (rows, cols) of one head")
    T, H, _ = ids_THk.shape
    _check_valid(valid_T, (T,), "valid_T")
    if ids_THk.numel() and (int(ids_THk.min()) < 0 or int(ids_THk.max()) >= n1 * n2):
        raise ValueError(f"ids_THk hold values in [{int(ids_THk.min())}, {int(ids_THk.max())}], outside one head's "
                         f"[0, n1*n2) = [0, {n1 * n2}); fix: pass per-head local ids (global id - h*n1*n2)")
    return count_subkeys(ids_THk.long(), n1, n2, valid_T)


def count_subkeys(ids_THk: Tensor, n1: int, n2: int, valid_T: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`subkey_counts` without its checks (no host sync), for ids from our own product-key search."""
    T, H, _ = ids_THk.shape
    weight_THk = torch.ones_like(ids_THk) if valid_T is None else valid_T.view(T, 1, 1).expand_as(ids_THk).long()
    head_H1 = torch.arange(H, device=ids_THk.device).view(1, H, 1)
    rows = torch.zeros(H * n1, dtype=torch.long, device=ids_THk.device)
    rows.scatter_add_(0, (ids_THk // n2 + head_H1 * n1).reshape(-1), weight_THk.reshape(-1))
    cols = torch.zeros(H * n2, dtype=torch.long, device=ids_THk.device)
    cols.scatter_add_(0, (ids_THk % n2 + head_H1 * n2).reshape(-1), weight_THk.reshape(-1))
    return rows.view(H, n1), cols.view(H, n2)


def subkey_marginal_loss(a_THn1: Tensor, b_THn2: Tensor, row_counts_Hn1: Tensor, col_counts_Hn2: Tensor,
                         num_tokens: int | Tensor, k: int, coeff: float, *, valid_T: Tensor | None = None) -> Tensor:
    """Sub-key marginal balance loss for product-key routing (this project; algorithms.md section 4): balance
    the n1 rows and n2 columns of each head's grid instead of its n1*n2 experts.

    Each head h owns a pool of n1 x n2 experts and picks k of them per token (K = H * k). Within the head,
    the full softmax over the grid factorises: p_ij = exp(a_i + b_j) / sum_i'j' exp(a_i' + b_j')
    = softmax(a)_i * softmax(b)_j, so its row marginal is

        sum_j p_ij = softmax(a)_i * sum_j softmax(b)_j = softmax(a)_i     (and the column marginal softmax(b)_j).

    With P^row_i = mean over valid tokens of softmax(a)_i, f^row_i = n1 / (k * T) * (selections whose row is i)
    (and the same for columns, T = ``num_tokens``):

        L = coeff * mean_h (1/2) * (sum_i f^row_h,i P^row_h,i + sum_j f^col_h,j P^col_h,j)

    Each half is a Switch-form loss over n1 (n2) bins whose counts sum to k*T, so L = coeff exactly when the
    rows and the columns are balanced, in particular at perfect expert balance. Why: at N = n1*n2 ~ 1M experts
    a micro-batch selects each expert ~T*k/N << 1 times, so f_i is mostly zeros and the expert-level loss is
    noise; each row and column is selected ~T*k/n times. The cost is O(T*H*(n1 + n2)), never O(T*N). The
    marginals cannot see imbalance inside the grid (e.g. all tokens on the diagonal); watch expert usage
    metrics for that. With a sigmoid score function the half softmaxes are still each head's row/column
    preference, a differentiable proxy. Pass each head's conditional pool (not the softmax across heads):
    each head fills its own k slots.

    a_THn1 [T, H, n1], b_THn2 [T, H, n2]: the half scores; row_counts_Hn1 / col_counts_Hn2 from
    :func:`subkey_counts`, all-reduced like ``counts_N`` in :func:`expert_balance_loss` (same variants).
    Returns a 0-dim tensor.
    """
    _check_coeff(coeff)
    _check_scores(a_THn1, 3, "a_THn1", "[T, H, n1]")
    _check_scores(b_THn2, 3, "b_THn2", "[T, H, n2]")
    T, H, n1 = a_THn1.shape
    if tuple(b_THn2.shape[:2]) != (T, H):
        raise ValueError(f"a_THn1 {tuple(a_THn1.shape)} and b_THn2 {tuple(b_THn2.shape)} disagree on [T, H]; "
                         "fix: pass both halves' scores of the same tokens and heads")
    n2 = b_THn2.shape[2]
    _check_counts(row_counts_Hn1, (H, n1), "row_counts_Hn1")
    _check_counts(col_counts_Hn2, (H, n2), "col_counts_Hn2")
    _check_topk(k, n1 * n2, "n1*n2")
    _check_num_tokens(num_tokens)
    _check_valid(valid_T, (T,), "valid_T")
    dtype = _compute_dtype(a_THn1)
    row_sums_Hn1, n_valid = _valid_sum(torch.softmax(a_THn1.to(dtype), dim=-1), valid_T)
    col_sums_Hn2, _ = _valid_sum(torch.softmax(b_THn2.to(dtype), dim=-1), valid_T)
    n_valid = n_valid.clamp(min=1)
    row_H = (_load_fraction(row_counts_Hn1, n1, k, num_tokens, dtype) * row_sums_Hn1 / n_valid).sum(-1)
    col_H = (_load_fraction(col_counts_Hn2, n2, k, num_tokens, dtype) * col_sums_Hn2 / n_valid).sum(-1)
    return coeff * 0.5 * (row_H + col_H).mean()


def subkey_candidate_loss(a_THk1: Tensor, row_THk1: Tensor, b_THk2: Tensor, col_THk2: Tensor,
                          row_counts_Hn1: Tensor, col_counts_Hn2: Tensor, num_tokens: int | Tensor, k: int,
                          coeff: float, *, valid_T: Tensor | None = None) -> Tensor:
    """Sub-key balance loss with the soft marginals restricted to each token's retrieval candidates (this
    project; algorithms.md section 4): :func:`subkey_marginal_loss` whose P comes from the k1 row and k2 column
    sub-keys the product-key search kept for the token (its top-k' per side), not from all n of each side.

    Each head h keeps, per token t, the candidate rows r_t,1..r_t,k1 with half scores a_t,1..a_t,k1 (and the
    columns c_t,j with b_t,j); the token's k experts are chosen among their k1 x k2 sums. With the softmax over
    the candidates only, pa_t,c = softmax(a_t,1..k1)_c, the row marginal of sub-key i is

        P^row_h,i = mean over valid tokens t of  sum_c [r_t,c = i] * pa_t,c       (0 where i is no candidate)

    (P^col likewise from b and the column candidates), f^row_h,i = n1 / (k * T) * (selections whose row is i)
    as in :func:`subkey_marginal_loss` (T = ``num_tokens``), and

        L = coeff * mean_h (1/2) * (sum_i f^row_h,i P^row_h,i + sum_j f^col_h,j P^col_h,j).

    Computed as coeff * mean_h (1/2) * mean_t (sum_c f^row_h,r_t,c pa_t,c + sum_j f^col_h,c_t,j pb_t,j): f is
    gathered at the candidates, so nothing of size [T, n] is built and the cost is O(T * H * (k1 + k2)).

    Value. Each token's candidate softmax sums to 1, so sum_i P^row_h,i = 1 and L = coeff exactly when the rows
    and the columns are balanced (f = 1), like the full loss; with k' >= n on both sides the candidates are all
    sub-keys and L is :func:`subkey_marginal_loss`. Why restrict: at N = n^2 ~ 1M the full marginals need every
    token's softmax over all n sub-keys, and their gradient a dense [T*H, n] x [n, D/2] product per side, as
    much work as the retrieval's scoring itself (+11% of a PEER layer step, benchmarks/RESULTS.md). Here the
    gradient reaches only the k' kept scores, dL/da_t,c = coeff / (2 H T_valid) * pa_t,c * (f_r_t,c -
    sum_c' pa_t,c' f_r_t,c'), which the retrieval's sparse backward (``_HalfTopK``) already carries: it lowers
    overloaded sub-keys against the other candidates of the same token, where the routing actually competes.
    What it cannot do: a sub-key that is no token's candidate gets no gradient, so a dead row is not pulled up
    directly (its overloaded rivals are pushed down towards it instead); the full marginals pull it up, at the
    dense cost. The same grid-diagonal blind spot as :func:`subkey_marginal_loss` applies.

    a_THk1 [T, H, k1], b_THk2 [T, H, k2]: each side's kept half scores (``product_key_topk_with_candidates``,
    differentiable); row_THk1 / col_THk2: their sub-key indices, integer, in [0, n1) / [0, n2) (not range
    checked: that would read them on the host every step; ``gather`` refuses out-of-range values).
    row_counts_Hn1 / col_counts_Hn2: from :func:`subkey_counts`, all-reduced like ``counts_N`` in
    :func:`expert_balance_loss`; they also give the grid (n1, n2). valid_T: False for padding tokens.
    Returns a 0-dim tensor (fp32, fp64 for fp64 scores).
    """
    _check_coeff(coeff)
    _check_scores(a_THk1, 3, "a_THk1", "[T, H, k1]")
    _check_scores(b_THk2, 3, "b_THk2", "[T, H, k2]")
    T, H, _ = a_THk1.shape
    if tuple(b_THk2.shape[:2]) != (T, H):
        raise ValueError(f"a_THk1 {tuple(a_THk1.shape)} and b_THk2 {tuple(b_THk2.shape)} disagree on [T, H]; "
                         "fix: pass both sides' candidates of the same tokens and heads")
    for name, idx, vals in (("row_THk1", row_THk1, a_THk1), ("col_THk2", col_THk2, b_THk2)):
        if idx.is_floating_point() or idx.dtype == torch.bool or idx.shape != vals.shape:
            raise ValueError(f"{name} of shape {tuple(idx.shape)} and dtype {idx.dtype}: expected integer sub-key "
                             f"indices of the scores' shape {list(vals.shape)}; fix: pass the indices returned "
                             "with the candidate scores by product_key_topk_with_candidates")
    for name, counts, vals in (("row_counts_Hn1", row_counts_Hn1, a_THk1), ("col_counts_Hn2", col_counts_Hn2, b_THk2)):
        if counts.dim() != 2 or counts.shape[0] != H or counts.shape[1] < vals.shape[2]:
            raise ValueError(f"{name} of shape {tuple(counts.shape)}: expected [H={H}, n] with n >= the "
                             f"{vals.shape[2]} candidates kept per token (n sub-keys on that side); fix: pass "
                             "subkey_counts(ids, n1, n2) of the same heads")
    n1, n2 = row_counts_Hn1.shape[1], col_counts_Hn2.shape[1]
    _check_topk(k, n1 * n2, "n1*n2")
    _check_num_tokens(num_tokens)
    _check_valid(valid_T, (T,), "valid_T")
    dtype = _compute_dtype(a_THk1)
    f_row_Hn1 = _load_fraction(row_counts_Hn1, n1, k, num_tokens, dtype)
    f_col_Hn2 = _load_fraction(col_counts_Hn2, n2, k, num_tokens, dtype)
    mass_TH = _candidate_mass(a_THk1, row_THk1, f_row_Hn1) + _candidate_mass(b_THk2, col_THk2, f_col_Hn2)
    sums_H, n_valid = _valid_sum(mass_TH, valid_T)
    return coeff * 0.5 * (sums_H / n_valid.clamp(min=1)).mean()


def _candidate_mass(v_THc: Tensor, idx_THc: Tensor, f_Hn: Tensor) -> Tensor:
    """sum_c softmax(v_t,h,:)_c * f_h,idx_t,h,c: [T, H], the f-weighted mass of each token's candidate softmax."""
    f_THc = f_Hn.unsqueeze(0).expand(v_THc.shape[0], -1, -1).gather(-1, idx_THc.long())
    return (torch.softmax(v_THc.to(f_Hn.dtype), dim=-1) * f_THc).sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Coefficient policy across granularity
# ----------------------------------------------------------------------------------------------------------

# The policies (GRANULARITY_POLICIES: multiplier of the G = 1 coefficient) are settings, defined in
# settings/balancing.py; their derivation is here.


def coefficient_for_granularity(coeff: float, granularity: int, policy: str = DEFAULT_COEFF_POLICY) -> float:
    """The coefficient to use at granularity G, given ``coeff`` tuned for the coarse model (G = 1), along the
    fine-grained family N = E*G routed experts, K = k0*G routed top-k (Krajewski et al., arXiv 2402.07871).

    Nothing applies this implicitly: a coefficient passed to a loss is used as given. Call this only to
    derive a coefficient from a G = 1 one; ``policy="constant"`` returns ``coeff`` unchanged.

    Derivation (Switch-form loss, softmax scores p_t = softmax(z_t), f fixed by the hard routing):
    dL/dz_t,j = (coeff/T) * sum_i f_i p_t,i (delta_ij - p_t,j) = (coeff/T) * p_t,j * (f_j - sum_i p_t,i f_i).
    Near uniform scores (p = 1/N, and sum_i f_i = N) this is (coeff/(T N)) * (f_j - 1). Under uniform random
    top-k routing count_j ~ Binomial(T, K/N), so Var f_j = (N - K)/(K T), and

        E ||dL/dz||^2 over the T x N logits = coeff^2 * (N - K) / (T^2 * N * K) = coeff^2 (1/K - 1/N) / T^2.

    A systematic overload f_j - 1 = delta_j gives the same N-dependence: ||dL/dz|| = coeff * rms(delta) / sqrt(T N).
    For a dense router z = x W (W: N rows of h), ||dL/dW||_F ~ sqrt(h) ||dL/dz||_F. Along the family,
    (1/K - 1/N) = (1/k0 - 1/E) / G, so at fixed coeff the router's gradient norm falls as G^{-1/2}, and the
    gradient of each expert's row (its share, one of N = E*G rows) as G^{-1}. Hence the policies, exact for
    every E and k0:
    - ``constant_gradient`` (default): coeff * sqrt(G) keeps ||dL/dz|| and ||dL/dW|| (the router weight's
      gradient norm) constant in G.
    - ``constant_gradient_per_expert``: coeff * G keeps the gradient of each expert's router row, i.e. the push
      on each expert's logit for a given relative overload, constant.
    - ``constant``: coeff (the loss *value* is already G-invariant; DeepSeekMoE and Krajewski et al. keep it).
    Caveat: with Adam what matters is the ratio to the language-model gradient on the same router rows, which
    also shrinks with G (each token's gate is split K ways); measure before trusting any policy at large G.
    Measured in tests/unit/test_balancing.py (E = 8, k0 = 1, G = 1..64).
    """
    _check_coeff(coeff)
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"granularity={granularity!r} must be an int >= 1; fix: pass G (experts = E*G, top-k = k0*G)")
    if policy not in GRANULARITY_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {sorted(GRANULARITY_POLICIES)}")
    return coeff * GRANULARITY_POLICIES[policy](granularity)
