"""Expert MLPs over tokens grouped by expert: one reference and the fast paths.

All compute ``out[t] = fc2_e( act(fc1_e(x[t])) * prob[t] )`` for the rows t of expert e, the
semantics of Megatron's SequentialMLP/TEGroupedMLP (the routing probability scales the activation,
before fc2). Kernels see tensors and a list of counts, never a config.

Legend: N token rows grouped by expert, E local experts, H hidden size, F expert hidden size
(F1 = F, or 2F for gated units, laid out [gate; up] like Megatron's fc1).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Activation = Callable[[torch.Tensor], torch.Tensor]


def expert_mlp_eager(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """Reference: a Python loop of two matmuls per expert. Defines the semantics."""
    outputs = []
    for e, (x_nH, p_n) in enumerate(zip(torch.split(x_NH, list(tokens_per_expert)), torch.split(probs_N, list(tokens_per_expert)))):
        h_nF = activation(x_nH @ w1_EF1H[e].t())
        h_nF = (h_nF * p_n.unsqueeze(-1)).to(h_nF.dtype)
        outputs.append(h_nF @ w2_EHF[e].t())
    return torch.cat(outputs, dim=0) if outputs else x_NH.new_zeros(0, w2_EHF.shape[1])


def expert_mlp_loop(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """One matmul pair per expert, on ``unbind`` views: for large experts on CPU this is as fast
    as BLAS gets. (Indexing ``w[e]`` instead would make autograd build a full-size zero gradient
    per expert; ``unbind``'s backward stacks the per-expert gradients once.)"""
    w1s, w2s = w1_EF1H.unbind(0), w2_EHF.unbind(0)
    outputs = []
    for e, (x_nH, p_n) in enumerate(zip(torch.split(x_NH, list(tokens_per_expert)), torch.split(probs_N, list(tokens_per_expert)))):
        if x_nH.shape[0] == 0:
            continue
        h_nF = activation(torch.nn.functional.linear(x_nH, w1s[e]))
        h_nF = (h_nF * p_n.unsqueeze(-1)).to(h_nF.dtype)
        outputs.append(torch.nn.functional.linear(h_nF, w2s[e]))
    return torch.cat(outputs, dim=0) if outputs else x_NH.new_zeros(0, w2_EHF.shape[1])


# Expert hidden size from which the per-expert loop beats the padded batched matmul on CPU
# (measured on the 2-core development machine: G=1 at F=2048 loop 434 ms vs bmm 565 ms; F=256
# 632 vs 686; F=32 1777 vs 1228; see benchmarks/RESULTS.md).
CPU_LOOP_MIN_EXPERT_SIZE = 256


def _padded_rows(tokens_per_expert: Sequence[int], device: torch.device) -> tuple[int, torch.Tensor | None]:
    """Rows per expert in the padded layout, and each token row's index there (None if the
    grouped layout already is the padded one: every expert has the same count)."""
    counts = list(tokens_per_expert)
    m = max(counts) if counts else 0
    if all(c == m for c in counts):
        return m, None
    counts_E = torch.tensor(counts, dtype=torch.long)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    expert_N = torch.repeat_interleave(torch.arange(len(counts)), counts_E)
    dest_N = expert_N * m + (torch.arange(int(counts_E.sum())) - starts_E[expert_N])
    return m, dest_N.to(device)


def expert_mlp_padded(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """Batched matmul over experts padded to the largest count (exact: padding rows are zero and
    dropped). One bmm per projection instead of 2E small matmuls; balanced routing pads nothing."""
    num_experts, hidden = w1_EF1H.shape[0], x_NH.shape[1]
    m, dest_N = _padded_rows(tokens_per_expert, x_NH.device)
    if m == 0:
        return x_NH.new_zeros(0, w2_EHF.shape[1]) if x_NH.shape[0] == 0 else x_NH * 0
    if dest_N is None:
        x_EMH = x_NH.view(num_experts, m, hidden)
        p_EM1 = probs_N.view(num_experts, m, 1)
    else:
        x_EMH = x_NH.new_zeros(num_experts * m, hidden).index_copy(0, dest_N, x_NH).view(num_experts, m, hidden)
        p_EM1 = probs_N.new_zeros(num_experts * m).index_copy(0, dest_N, probs_N).view(num_experts, m, 1)
    h_EMF = activation(torch.bmm(x_EMH, w1_EF1H.transpose(1, 2)))
    h_EMF = (h_EMF * p_EM1).to(h_EMF.dtype)
    out_EMH = torch.bmm(h_EMF, w2_EHF.transpose(1, 2))
    out_XH = out_EMH.reshape(num_experts * m, -1)
    return out_XH if dest_N is None else out_XH.index_select(0, dest_N)


def expert_mlp_grouped_mm(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """``torch._grouped_mm`` (CUDA grouped GEMM; no padding). On CPU it exists but is slower than
    the padded bmm and its backward rejects stride-0 gradients, so the module uses it on CUDA only."""
    offs_E = torch.cumsum(torch.tensor(list(tokens_per_expert), device=x_NH.device), 0).to(torch.int32)
    h_NF = activation(torch._grouped_mm(x_NH, w1_EF1H.transpose(1, 2), offs=offs_E))
    h_NF = (h_NF * probs_N.unsqueeze(-1)).to(h_NF.dtype)
    return torch._grouped_mm(h_NF, w2_EHF.transpose(1, 2), offs=offs_E)


def grouped_mm_supported(x_NH: torch.Tensor, w1_EF1H: torch.Tensor, w2_EHF: torch.Tensor) -> bool:
    """torch's grouped GEMM needs CUDA and 16-byte aligned rows (dims multiples of 8 in bf16)."""
    if not (x_NH.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    align = 16 // x_NH.element_size()
    dims = (x_NH.shape[1], w1_EF1H.shape[1], w2_EHF.shape[1], w2_EHF.shape[2])
    return x_NH.dtype in (torch.bfloat16, torch.float16, torch.float32) and all(d % align == 0 for d in dims)


def expert_mlp_grouped(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """The default: torch's grouped GEMM where it can run; otherwise the per-expert loop for large
    experts and the padded batched matmul for small ones."""
    if grouped_mm_supported(x_NH, w1_EF1H, w2_EHF):
        return expert_mlp_grouped_mm(x_NH, tokens_per_expert, w1_EF1H, w2_EHF, probs_N, activation)
    if w2_EHF.shape[2] >= CPU_LOOP_MIN_EXPERT_SIZE:
        return expert_mlp_loop(x_NH, tokens_per_expert, w1_EF1H, w2_EHF, probs_N, activation)
    return expert_mlp_padded(x_NH, tokens_per_expert, w1_EF1H, w2_EHF, probs_N, activation)


def expert_mlp_te(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
) -> torch.Tensor:
    """Transformer Engine grouped GEMMs (FP8 under a TE autocast), ``kernels/te_grouped.py``. Imported
    on the first call, so importing this module never imports Transformer Engine."""
    from megatron_moe_ext.kernels.te_grouped import expert_mlp_te as impl

    return impl(x_NH, tokens_per_expert, w1_EF1H, w2_EHF, probs_N, activation)


EXPERT_MLP_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": expert_mlp_eager,
    "loop": expert_mlp_loop,
    "padded": expert_mlp_padded,
    "grouped_mm": expert_mlp_grouped_mm,
    "grouped": expert_mlp_grouped,
    "te": expert_mlp_te,
}


def get_expert_mlp_kernel(name: str) -> Callable[..., torch.Tensor]:
    """The kernel registered as ``name``; ValueError listing the choices otherwise."""
    try:
        return EXPERT_MLP_KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown expert kernel {name!r}; choose from {', '.join(EXPERT_MLP_KERNELS)}") from None
