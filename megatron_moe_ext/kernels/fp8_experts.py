"""FP8 expert MLPs through torch's scaled matmul: ``expert_mlp_fp8`` (no Transformer Engine needed).

Exactly the semantics of ``expert_mlp_eager`` (``kernels/expert_mlp.py``): per expert e and routed
row t, ``out[t] = W2_e (act(W1_e x[t] + b1_e) * p[t]) + b2_e * p[t]``, with the four GEMM operands of
the forward and the eight of the backward cast to FP8 with current scaling (``kernels/fp8_scaling.py``):

* forward: x and W1 (e4m3) -> fc1, accumulated in float32; fc1 bias, activation and probability in
  float32; s = act(h) * p cast to e4m3 with W2 -> fc2; fc2 bias times p in float32; the output is
  rounded once to x's dtype;
* backward: the incoming gradients (the output gradient g for dS = g W2 and dW2 = g^T s, the fc1
  output gradient dH for dX = dH W1 and dW1 = dH^T x) in e5m2 under the 'hybrid' format, e4m3 under
  'e4m3'; the other operand in e4m3; every GEMM accumulates in float32 (bfloat16 output where CUDA's
  rowwise scaled GEMM offers no other); the activation's derivative, the bias and probability
  gradients in float32. Gradients are returned in their tensor's dtype: master weights stay in the
  parameter dtype, as Megatron keeps them (its DistributedOptimizer keeps float32 main params).

Scales are per expert: every "tensor" of the 'tensorwise' recipe is one expert's operand (its rows of
x, its W1, ...), as Transformer Engine's grouped GEMM quantizes each group's inputs separately; the
'rowwise' recipe scales each row of a left operand and each column of a right one along the GEMM's
contraction dimension. So an expert's result depends on its own rows only, in any order: the same
with the experts spread over expert-parallel ranks (up to float32 summation order).

Current scaling keeps no state across steps: nothing is checkpointed.

GEMMs: on CPU (and anywhere ``torch._scaled_grouped_mm`` cannot take them) one ``torch._scaled_mm``
per expert; on CUDA with ``torch._scaled_grouped_mm`` and 16-aligned dimensions the e4m3 x e4m3
GEMMs over token rows (fc1, fc2, and both data gradients under the 'e4m3' format) are one grouped
call each (``_grouped_rows_mm``); the weight gradients stay per expert.

Legend: N token rows grouped by expert, n rows of one expert, E local experts, H hidden size,
F expert hidden size, F1 = F or 2F (gated units, [gate; up]), M/K/N' rows/contraction/columns of
one GEMM.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

from megatron_moe_ext.kernels.expert_mlp import expert_of_rows
from megatron_moe_ext.kernels.fp8_scaling import FP8_DTYPES, RECIPES, quantize_operand
from megatron_moe_ext.settings.experts import FP8_GEMM_ALIGNMENT as CUDA_FP8_ALIGNMENT
from megatron_moe_ext.settings.experts import MOE_FP8_FORMATS as FP8_FORMATS

Activation = Callable[[torch.Tensor], torch.Tensor]


def grad_dtype(fp8_format: str) -> torch.dtype:
    """The FP8 dtype of gradients in backward: e5m2 under 'hybrid', e4m3 under 'e4m3'."""
    if fp8_format not in FP8_FORMATS:
        raise ValueError(f"FP8 format {fp8_format!r} is unknown; choose from {', '.join(FP8_FORMATS)}")
    return FP8_DTYPES["e5m2" if fp8_format == "hybrid" else "e4m3"]


def _out_dtype(device: torch.device, recipe: str) -> torch.dtype:
    """float32 accumulation output; CUDA's rowwise scaled GEMM writes bfloat16 only."""
    return torch.bfloat16 if device.type == "cuda" and recipe == "rowwise" else torch.float32


def scaled_matmul(
    a_MK: torch.Tensor, b_KN: torch.Tensor, *, a_dtype: torch.dtype, b_dtype: torch.dtype, recipe: str
) -> torch.Tensor:
    """float32 ``a @ b`` with both operands cast to FP8 (current scaling along K) and one
    ``torch._scaled_mm``. On CUDA, K is zero-padded to a multiple of 16 (exact: zero products)."""
    m, k = a_MK.shape
    n = b_KN.shape[1]
    if m == 0 or n == 0 or k == 0:
        return a_MK.new_zeros(m, n, dtype=torch.float32)
    qa_MK, inv_a = quantize_operand(a_MK, dtype=a_dtype, recipe=recipe, dim=-1)
    qb_KN, inv_b = quantize_operand(b_KN, dtype=b_dtype, recipe=recipe, dim=0)
    if a_MK.is_cuda and k % CUDA_FP8_ALIGNMENT:
        pad = CUDA_FP8_ALIGNMENT - k % CUDA_FP8_ALIGNMENT
        qa_MK = torch.cat([qa_MK, qa_MK.new_zeros(m, pad)], dim=1)
        qb_KN = torch.cat([qb_KN, qb_KN.new_zeros(pad, n)], dim=0)
    qb_KN = qb_KN.t().contiguous().t()  # column-major, as CUDA's _scaled_mm requires
    out = torch._scaled_mm(qa_MK.contiguous(), qb_KN, scale_a=inv_a, scale_b=inv_b,
                           out_dtype=_out_dtype(a_MK.device, recipe))
    return out.float()


def grouped_supported(x_NH: torch.Tensor, w1_EF1H: torch.Tensor, w2_EHF: torch.Tensor) -> bool:
    """CUDA with ``torch._scaled_grouped_mm`` (Hopper and later) and every GEMM dimension 16-aligned."""
    if not (x_NH.is_cuda and hasattr(torch, "_scaled_grouped_mm")):
        return False
    if torch.cuda.get_device_capability(x_NH.device) < (9, 0):
        return False
    dims = (x_NH.shape[1], w1_EF1H.shape[1], w2_EHF.shape[1], w2_EHF.shape[2])
    return all(d % CUDA_FP8_ALIGNMENT == 0 for d in dims)


def _grouped_rows_mm(
    a_NK: torch.Tensor, b_EKN: torch.Tensor, counts: Sequence[int], *, recipe: str
) -> torch.Tensor:
    """float32 rows of ``a_n @ b_e`` for each expert's rows n, e4m3 x e4m3, one
    ``torch._scaled_grouped_mm`` (rowwise scale vectors; the tensorwise recipe's per-expert scale
    repeated over the expert's rows/columns, the same numbers). Output bfloat16, the grouped GEMM's."""
    e4m3 = FP8_DTYPES["e4m3"]
    num_experts, _, n_out = b_EKN.shape
    qa, inv_a = [], []
    for a_nK in torch.split(a_NK, list(counts)):
        q, inv = quantize_operand(a_nK, dtype=e4m3, recipe=recipe, dim=-1)
        qa.append(q)
        inv_a.append(inv.reshape(-1).expand(a_nK.shape[0]) if recipe == "tensorwise" else inv.reshape(-1))
    qb, inv_b = [], []
    for e in range(num_experts):
        q, inv = quantize_operand(b_EKN[e], dtype=e4m3, recipe=recipe, dim=0)
        qb.append(q)
        inv_b.append(inv.reshape(-1).expand(n_out) if recipe == "tensorwise" else inv.reshape(-1))
    qb_EKN = torch.stack(qb).transpose(1, 2).contiguous().transpose(1, 2)  # column-major per expert
    offs_E = torch.cumsum(torch.tensor(list(counts), device=a_NK.device), 0).to(torch.int32)
    out = torch._scaled_grouped_mm(
        torch.cat(qa).contiguous(), qb_EKN, torch.cat(inv_a).contiguous(), torch.stack(inv_b).contiguous(),
        offs=offs_E, out_dtype=torch.bfloat16,
    )
    return out.float()


def _per_expert_rows_mm(
    a_NK: torch.Tensor, b_EKN: Sequence[torch.Tensor], counts: Sequence[int], *, a_dtype: torch.dtype,
    b_dtype: torch.dtype, recipe: str,
) -> torch.Tensor:
    """float32 rows of ``a_n @ b_e`` for each expert's rows n: one ``_scaled_mm`` per expert."""
    outs = [scaled_matmul(a_nK, b_EKN[e], a_dtype=a_dtype, b_dtype=b_dtype, recipe=recipe)
            for e, a_nK in enumerate(torch.split(a_NK, list(counts)))]
    return torch.cat(outs) if outs else a_NK.new_zeros(0, b_EKN[0].shape[1] if len(b_EKN) else 0)


def _rows_mm(
    a_NK: torch.Tensor, b_EKN: torch.Tensor, counts: Sequence[int], *, a_dtype: torch.dtype, grouped: bool,
    recipe: str,
) -> torch.Tensor:
    """float32 rows of ``a_n @ b_e`` per expert (b in e4m3): one grouped call where ``grouped`` and the left
    operand is e4m3 too (the grouped GEMM takes e4m3 x e4m3 only), else one ``_scaled_mm`` per expert."""
    if grouped and a_dtype == FP8_DTYPES["e4m3"]:
        return _grouped_rows_mm(a_NK, b_EKN, counts, recipe=recipe)
    return _per_expert_rows_mm(a_NK, b_EKN.unbind(0), counts, a_dtype=a_dtype, b_dtype=FP8_DTYPES["e4m3"],
                               recipe=recipe)


class _FP8ExpertMLP(torch.autograd.Function):
    """Forward and backward of the FP8 expert MLP (see the module docstring); the activation is
    recomputed from the saved float32 fc1 output in backward, under autograd."""

    @staticmethod
    def forward(
        ctx,
        x_NH: torch.Tensor,
        w1_EF1H: torch.Tensor,
        w2_EHF: torch.Tensor,
        probs_N: torch.Tensor,
        b1_EF1: torch.Tensor | None,
        b2_EH: torch.Tensor | None,
        counts: list[int],
        activation: Activation,
        recipe: str,
        fp8_format: str,
    ) -> torch.Tensor:
        e4m3 = FP8_DTYPES["e4m3"]
        grouped = grouped_supported(x_NH, w1_EF1H, w2_EHF)
        expert_N = expert_of_rows(counts, x_NH.device)
        p_N1 = probs_N.float().unsqueeze(-1)
        h_NF1 = _rows_mm(x_NH, w1_EF1H.transpose(1, 2), counts, a_dtype=e4m3, grouped=grouped, recipe=recipe)
        if b1_EF1 is not None:
            h_NF1 = h_NF1 + b1_EF1.float()[expert_N]
        with torch.no_grad():
            s_NF = activation(h_NF1) * p_N1
        out_NH = _rows_mm(s_NF, w2_EHF.transpose(1, 2), counts, a_dtype=e4m3, grouped=grouped, recipe=recipe)
        if b2_EH is not None:
            out_NH = out_NH + b2_EH.float()[expert_N] * p_N1
        ctx.save_for_backward(x_NH, w1_EF1H, w2_EHF, probs_N, b2_EH, h_NF1, s_NF, expert_N)
        ctx.b1_meta = None if b1_EF1 is None else (b1_EF1.shape, b1_EF1.dtype)
        ctx.counts, ctx.activation, ctx.recipe, ctx.fp8_format = counts, activation, recipe, fp8_format
        ctx.grouped = grouped
        return out_NH.to(x_NH.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_NH: torch.Tensor):
        x_NH, w1_EF1H, w2_EHF, probs_N, b2_EH, h_NF1, s_NF, expert_N = ctx.saved_tensors
        need_x, need_w1, need_w2, need_p, need_b1, need_b2 = ctx.needs_input_grad[:6]
        counts, recipe = ctx.counts, ctx.recipe
        e4m3, g_dtype = FP8_DTYPES["e4m3"], grad_dtype(ctx.fp8_format)
        g_NH = grad_NH.contiguous()
        g_split = torch.split(g_NH, list(counts))
        p_N1 = probs_N.float().unsqueeze(-1)
        grad_x = grad_w1 = grad_w2 = grad_p = grad_b1 = grad_b2 = None

        if need_w2:
            s_split = torch.split(s_NF, list(counts))
            grad_w2 = torch.stack([
                scaled_matmul(g_nH.t(), s_nF, a_dtype=g_dtype, b_dtype=e4m3, recipe=recipe)
                for g_nH, s_nF in zip(g_split, s_split)
            ]).to(w2_EHF.dtype)
        if need_b2:
            grad_b2 = torch.zeros(b2_EH.shape, dtype=torch.float32, device=g_NH.device)
            grad_b2.index_add_(0, expert_N, g_NH.float() * p_N1)
            grad_b2 = grad_b2.to(b2_EH.dtype)
        if not (need_x or need_w1 or need_b1 or need_p):
            return grad_x, grad_w1, grad_w2, grad_p, grad_b1, grad_b2, None, None, None, None

        # dS = g W2 (per expert), then through s = act(h) * p.
        grad_s_NF = _rows_mm(g_NH, w2_EHF, counts, a_dtype=g_dtype, grouped=ctx.grouped, recipe=recipe)
        with torch.enable_grad():
            h_leaf = h_NF1.detach().requires_grad_(True)
            a_NF = ctx.activation(h_leaf)
        if need_p:
            grad_p_N = (grad_s_NF * a_NF.detach()).sum(-1)
            if b2_EH is not None:
                grad_p_N = grad_p_N + (g_NH.float() * b2_EH.float()[expert_N]).sum(-1)
            grad_p = grad_p_N.to(probs_N.dtype)
        if not (need_x or need_w1 or need_b1):
            return grad_x, grad_w1, grad_w2, grad_p, grad_b1, grad_b2, None, None, None, None
        (grad_h_NF1,) = torch.autograd.grad(a_NF, h_leaf, grad_s_NF * p_N1)

        if need_x:
            grad_x_NH = _rows_mm(grad_h_NF1, w1_EF1H, counts, a_dtype=g_dtype, grouped=ctx.grouped, recipe=recipe)
            grad_x = grad_x_NH.to(x_NH.dtype)
        if need_w1:
            grad_w1 = torch.stack([
                scaled_matmul(gh_nF1.t(), x_nH, a_dtype=g_dtype, b_dtype=e4m3, recipe=recipe)
                for gh_nF1, x_nH in zip(torch.split(grad_h_NF1, list(counts)), torch.split(x_NH, list(counts)))
            ]).to(w1_EF1H.dtype)
        if need_b1:
            shape, dtype = ctx.b1_meta
            grad_b1 = torch.zeros(shape, dtype=torch.float32, device=g_NH.device)
            grad_b1.index_add_(0, expert_N, grad_h_NF1)
            grad_b1 = grad_b1.to(dtype)
        return grad_x, grad_w1, grad_w2, grad_p, grad_b1, grad_b2, None, None, None, None


def expert_mlp_fp8(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
    *,
    b1_EF1: torch.Tensor | None = None,
    b2_EH: torch.Tensor | None = None,
    recipe: str = "tensorwise",
    fp8_format: str = "hybrid",
) -> torch.Tensor:
    """``expert_mlp_eager``'s result with FP8 GEMM operands (module docstring): ``recipe``
    'tensorwise' or 'rowwise' current scaling, ``fp8_format`` 'hybrid' (e5m2 gradients) or 'e4m3'."""
    counts = [int(c) for c in tokens_per_expert]
    if len(counts) != w1_EF1H.shape[0] or sum(counts) != x_NH.shape[0]:
        raise ValueError(
            f"tokens_per_expert has {len(counts)} counts summing to {sum(counts)}; expected {w1_EF1H.shape[0]} "
            f"experts and {x_NH.shape[0]} rows"
        )
    if recipe not in RECIPES:
        raise ValueError(f"FP8 recipe {recipe!r} is unknown; choose from {', '.join(RECIPES)}")
    grad_dtype(fp8_format)  # checks the format
    return _FP8ExpertMLP.apply(x_NH.contiguous(), w1_EF1H, w2_EHF, probs_N.contiguous(), b1_EF1, b2_EH, counts,
                               activation, recipe, fp8_format)
