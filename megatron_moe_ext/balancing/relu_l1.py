"""ReMoE's load-weighted L1 penalty on ReLU gates and its adaptive coefficient (pure functions).

ReMoE (Wang et al., "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing", ICLR 2025,
arXiv 2412.14711; its adaptive L1 regularisation and the load-balancing refinement of it): gates R = ReLU(x W^T) are sparsified by an L1 penalty whose
per-expert weight is the expert's load, so that it also balances the experts,

    L_reg = lambda * 1/T * sum_t sum_e w_e R_te,        w_e = N / (k T) * #{t : R_te > 0}

(T tokens, N experts, k the target active experts per token, so w_e = 1 for every expert at the
target compute with a balanced load). The authors' Megatron implementation (thu-ml/ReMoE,
``ReLURouter.apply_l1_reg``) computes it with the Switch load-balancing formula,
lambda * N / (k T^2) * sum_e count_e * sum_t R_te, with the counts summed over the ranks holding the
same sequences (TP x CP) and T the tokens of those ranks; ``relu_l1_penalty`` is that, with padding
excluded. ReMoE's k is ``--moe-router-topk``; here it is the target active experts (1 - target
sparsity) x N, which equals top-k at the default target.

The coefficient follows the paper's zeroth-order controller (as in the authors' ``training.py``):
lambda_{i+1} = lambda_i * alpha^sign(target - S_i), with S_i the fraction of zero gates of step i
(over all layers, tokens and ranks): multiplied by alpha while the gates are denser than the target,
divided otherwise (the authors' code divides when S_i equals the target too; so does ``adapted_l1_coeff``).

Legend: T tokens, N experts.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def relu_l1_penalty(
    gates_TN: Tensor,
    counts_N: Tensor,
    num_tokens: int | Tensor,
    *,
    target_active: float,
    coeff: float | Tensor,
    valid_T: Tensor | None = None,
) -> Tensor:
    """lambda * N / (k T^2) * sum_e count_e * sum_{valid t} R_te (0-dim, differentiable in ``gates_TN``).

    gates_TN: this rank's ReLU gates (>= 0); counts_N: tokens with a nonzero gate per expert, summed
    over the ranks holding other tokens of the same sequences (no gradient); num_tokens: the valid
    tokens of those ranks (T); target_active: k = (1 - target sparsity) x N; coeff: lambda.
    Summed over those ranks, the penalties of their local gates are the whole formula.
    """
    if gates_TN.dim() != 2:
        raise ValueError(f"gates_TN of shape {tuple(gates_TN.shape)}: expected [T, N]")
    N = gates_TN.shape[1]
    if counts_N.shape != (N,):
        raise ValueError(f"counts_N of shape {tuple(counts_N.shape)}: expected [{N}] (one count per expert)")
    if not target_active > 0:
        raise ValueError(f"target_active {target_active} must be > 0 (the target active experts per token)")
    gates = gates_TN.float()
    if valid_T is not None:
        gates = gates * valid_T.unsqueeze(-1).to(gates.dtype)
    tokens = torch.as_tensor(num_tokens, dtype=torch.float32, device=gates.device).clamp(min=1.0)
    weighted = (gates.sum(0) * counts_N.detach().to(gates.dtype)).sum()
    return weighted * (N / target_active) / tokens.square() * coeff


def gate_sparsity_counts(map_TN: Tensor, valid_T: Tensor | None = None) -> Tensor:
    """[zero gates, gates] of the valid tokens (fp64, 2 entries): the step's sparsity is their ratio."""
    if valid_T is None:
        total = torch.tensor(float(map_TN.numel()), dtype=torch.float64, device=map_TN.device)
        active = map_TN.sum().to(torch.float64)
    else:
        total = valid_T.sum().to(torch.float64) * map_TN.shape[1]
        active = (map_TN & valid_T.unsqueeze(-1)).sum().to(torch.float64)
    return torch.stack([total - active, total])


def adapted_l1_coeff(coeff: Tensor, sparsity: Tensor, *, target: float, rate: float) -> Tensor:
    """lambda * alpha^sign(target - S): times ``rate`` if the sparsity S is below the target, else
    divided by it (ReMoE's controller; S == target divides, as the authors' code)."""
    if not rate > 1:
        raise ValueError(f"rate {rate} must be > 1 (a multiplicative step)")
    up = sparsity < target
    return torch.where(up, coeff * rate, coeff / rate).to(coeff.dtype)
