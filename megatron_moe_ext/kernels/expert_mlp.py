"""Expert MLPs over tokens grouped by expert: one reference and the fast paths.

All compute ``out[t] = W2_e (act(W1_e x[t] + b1_e) * p[t]) + b2_e * p[t]`` for the rows t of
expert e, the semantics of Megatron's SequentialMLP/TEGroupedMLP with ``add_bias_linear``
(megatron/core/transformer/mlp.py, ``MLP.forward`` with ``per_token_scale``; TEGroupedMLP._apply_bias):
the routing probability p scales the activation before fc2 AND the fc2 bias, which is added
after fc2 in the promoted dtype of bias and probability and rounded once to the output's dtype
(``output += output_bias * per_token_scale``); the fc1 bias is added before the activation and
is not scaled. The biases ``b1 [E, F1]``, ``b2 [E, H]`` are optional keyword arguments (None:
no bias, the only case before biases existed). Kernels see tensors and a list of counts, never
a config.

Legend: N token rows grouped by expert, E local experts, H hidden size, F expert hidden size
(F1 = F, or 2F for gated units, laid out [gate; up] like Megatron's fc1); in the segmented kernel
B rows of a block, K experts of a run, M rows of each.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch.autograd.function import once_differentiable

Activation = Callable[[torch.Tensor], torch.Tensor]

# The segmented kernel's per-expert loops bypass torch-function handling (modes and subclasses):
# the CPU runtime's TorchFunctionMode (runtime/cpu.py) costs every torch call a Python round trip,
# and the loops make ~30 calls per expert (slices, views, matmuls). Safe only because the loops
# create no tensor from a device argument: they slice, view and multiply tensors already on the
# input's device (the activation, which may, runs outside). Measured on the 2-core VM under the
# runtime: slice + slice + mm 12.9 us with the mode, 5.8 us bypassed; segmented fwd+bwd with 512
# experts of 32 (near-balanced rows, one thread, min of 7) 1588 ms bypassed vs 1607 ms not.
BYPASS_TORCH_FUNCTION_IN_LOOPS = True


def _untraced() -> contextlib.AbstractContextManager:
    """Context for the segmented kernel's matmul loops (see BYPASS_TORCH_FUNCTION_IN_LOOPS)."""
    return torch._C.DisableTorchFunction() if BYPASS_TORCH_FUNCTION_IN_LOOPS else contextlib.nullcontext()


def _add_scaled_bias(out_nH: torch.Tensor, b2_H: torch.Tensor, p_n: torch.Tensor) -> torch.Tensor:
    """``out + b2 * p`` as Megatron's ``output += output_bias * per_token_scale``: the product in
    the promoted dtype of bias and probability, the sum rounded once to the output's dtype."""
    return (out_nH + b2_H * p_n.unsqueeze(-1)).to(out_nH.dtype)


def expert_mlp_eager(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
    *,
    b1_EF1: torch.Tensor | None = None,
    b2_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: a Python loop of two matmuls per expert. Defines the semantics."""
    outputs = []
    for e, (x_nH, p_n) in enumerate(zip(torch.split(x_NH, list(tokens_per_expert)), torch.split(probs_N, list(tokens_per_expert)))):
        h_nF1 = x_nH @ w1_EF1H[e].t()
        if b1_EF1 is not None:
            h_nF1 = h_nF1 + b1_EF1[e]
        h_nF = activation(h_nF1)
        h_nF = (h_nF * p_n.unsqueeze(-1)).to(h_nF.dtype)
        out_nH = h_nF @ w2_EHF[e].t()
        if b2_EH is not None:
            out_nH = _add_scaled_bias(out_nH, b2_EH[e], p_n)
        outputs.append(out_nH)
    return torch.cat(outputs, dim=0) if outputs else x_NH.new_zeros(0, w2_EHF.shape[1])


def expert_mlp_loop(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
    *,
    b1_EF1: torch.Tensor | None = None,
    b2_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """One matmul pair per expert, on ``unbind`` views: for large experts on CPU this is as fast
    as BLAS gets. (Indexing ``w[e]`` instead would make autograd build a full-size zero gradient
    per expert; ``unbind``'s backward stacks the per-expert gradients once.)"""
    w1s, w2s = w1_EF1H.unbind(0), w2_EHF.unbind(0)
    b1s = b1_EF1.unbind(0) if b1_EF1 is not None else [None] * w1_EF1H.shape[0]
    b2s = b2_EH.unbind(0) if b2_EH is not None else None
    outputs = []
    for e, (x_nH, p_n) in enumerate(zip(torch.split(x_NH, list(tokens_per_expert)), torch.split(probs_N, list(tokens_per_expert)))):
        if x_nH.shape[0] == 0:
            continue
        h_nF = activation(torch.nn.functional.linear(x_nH, w1s[e], b1s[e]))
        h_nF = (h_nF * p_n.unsqueeze(-1)).to(h_nF.dtype)
        out_nH = torch.nn.functional.linear(h_nF, w2s[e])
        outputs.append(out_nH if b2s is None else _add_scaled_bias(out_nH, b2s[e], p_n))
    return torch.cat(outputs, dim=0) if outputs else x_NH.new_zeros(0, w2_EHF.shape[1])


# The segmented kernel runs its elementwise steps (activation, probability scaling and their
# gradients) on blocks of whole experts holding about this many elements of fc1's output, not on
# all N rows at once: still a handful of calls whatever the number of experts, but every buffer
# stays a few MB. A whole [N, F] buffer is tens of MB, and glibc serves blocks above 32 MiB with a
# fresh mmap on every call, whose page faults cost more than the arithmetic (measured on the 2-core
# VM, one thread: allocating and filling 32 MiB 22 ms against 2.2 ms for refilling a reused
# buffer; gelu on [4096, 2048] 30 ms into a fresh buffer against 8 ms in 8 blocks; the whole
# segmented fwd+bwd at 8 experts of 2048 690 ms in blocks against 748 ms on whole buffers); the
# blocks also stay in cache between the matmul that writes them and the elementwise ops that read
# them. An expert is split over blocks only above SEGMENTED_SPLIT_FACTOR times this: a split
# expert's weight gradients are accumulated piece by piece, which costs a pass over them per piece.
SEGMENTED_BLOCK_ELEMENTS = 1 << 20
SEGMENTED_SPLIT_FACTOR = 4

Piece = tuple[int, int, int]  # (expert, first row, end row) in the grouped rows


def _row_blocks(counts: Sequence[int], width: int, block_elements: int) -> list[tuple[int, int, list[Piece]]]:
    """Consecutive row ranges [start, end) covering all N rows, each with the pieces of expert
    segments it holds: consecutive whole experts up to ``block_elements`` elements of ``width``
    per row (an expert above that alone), and an expert above SEGMENTED_SPLIT_FACTOR times that
    split into equal blocks of its own."""
    blocks: list[tuple[int, int, list[Piece]]] = []
    start, pieces, elements = 0, [], 0  # the block being filled
    row = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        size = count * width
        if pieces and elements + size > block_elements:
            blocks.append((start, row, pieces))
            start, pieces, elements = row, [], 0
        if size > SEGMENTED_SPLIT_FACTOR * block_elements:
            step = -(-count // -(-size // block_elements))  # ceil(count / number of blocks)
            for lo in range(row, row + count, step):
                hi = min(lo + step, row + count)
                blocks.append((lo, hi, [(e, lo, hi)]))
            start = row + count
        else:
            pieces.append((e, row, row + count))
            elements += size
        row += count
    if pieces:
        blocks.append((start, row, pieces))
    return blocks


Run = tuple[int, int, int, int, bool]  # (first expert, experts, first row, rows per expert, continues)


def _runs(pieces: list[Piece], segment_starts: Sequence[int]) -> list[Run]:
    """A block's pieces as runs of consecutive experts with equal row counts, one batched matmul
    each (exactly balanced or capacity-padded routing: all of a block's experts in one call). A
    piece continuing an expert begun in the previous block stays alone: it accumulates into that
    expert's weight gradient instead of writing it."""
    runs: list[Run] = []
    for e, lo, hi in pieces:
        continues = lo > segment_starts[e]
        if runs and not continues and not runs[-1][4]:
            e0, k, lo0, m, _ = runs[-1]
            if e == e0 + k and hi - lo == m:
                runs[-1] = (e0, k + 1, lo0, m, False)
                continue
        runs.append((e, 1, lo, hi - lo, continues))
    return runs


def _bmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    if accumulate:
        out.baddbmm_(a, b)
    else:
        torch.bmm(a, b, out=out)


class _SegmentedExpertMLP(torch.autograd.Function):
    """Both projections as matmuls on row slices (views, so nothing is padded or gathered), one
    (batched) matmul per run of experts (``_runs``), in one autograd node for all experts; the
    elementwise steps run once per block of rows (see SEGMENTED_BLOCK_ELEMENTS). The activation's
    graph is kept from the forward (as autograd keeps the eager reference's), not recomputed.
    Biases: fc1's is the ``input`` of the run's ``baddbmm``; fc2's, scaled by the probability, is
    added to each run's output; their gradients are per-run row sums."""

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
        grad_to_fc1: bool,
        block_elements: int,
    ) -> torch.Tensor:
        n, fc1_rows, hidden = x_NH.shape[0], w1_EF1H.shape[1], w2_EHF.shape[1]
        segment_starts = [0]
        for c in counts[:-1]:
            segment_starts.append(segment_starts[-1] + c)
        blocks = [(start, end, _runs(pieces, segment_starts))
                  for start, end, pieces in _row_blocks(counts, fc1_rows, block_elements)]
        w1t_EHF1, w2t_EFH = w1_EF1H.transpose(1, 2), w2_EHF.transpose(1, 2)
        out_NH = None
        saved: list[torch.Tensor] = []
        for start, end, runs in blocks:
            h_BF1 = x_NH.new_empty(end - start, fc1_rows)
            with _untraced():
                for e, k, lo, m, _ in runs:
                    hi = lo + k * m
                    h_KMF1 = h_BF1[lo - start:hi - start].view(k, m, -1)
                    if b1_EF1 is None:
                        torch.bmm(x_NH[lo:hi].view(k, m, -1), w1t_EHF1[e:e + k], out=h_KMF1)
                    else:
                        torch.baddbmm(b1_EF1[e:e + k].unsqueeze(1), x_NH[lo:hi].view(k, m, -1), w1t_EHF1[e:e + k],
                                      out=h_KMF1)
            # The activation's own graph (h -> a) for the backward, only if a gradient reaches fc1.
            with torch.enable_grad() if grad_to_fc1 else contextlib.nullcontext():
                a_BF = activation(h_BF1.requires_grad_(grad_to_fc1))
            s_BF = (a_BF.detach() * probs_N[start:end].unsqueeze(-1)).to(a_BF.dtype)
            if out_NH is None:
                out_NH = s_BF.new_empty(n, hidden)
            with _untraced():
                for e, k, lo, m, _ in runs:
                    hi = lo + k * m
                    out_KMH = out_NH[lo:hi].view(k, m, -1)
                    torch.bmm(s_BF[lo - start:hi - start].view(k, m, -1), w2t_EFH[e:e + k], out=out_KMH)
                    if b2_EH is not None:  # in the promoted dtype, rounded once (in-place add)
                        out_KMH.add_(b2_EH[e:e + k].unsqueeze(1) * probs_N[lo:hi].view(k, m, 1))
            saved += [h_BF1, a_BF, s_BF]
        ctx.save_for_backward(x_NH, w1_EF1H, w2_EHF, probs_N, b2_EH, *saved)
        ctx.b1_shape = None if b1_EF1 is None else (b1_EF1.shape, b1_EF1.dtype)
        ctx.blocks, ctx.counts = blocks, counts
        return out_NH if out_NH is not None else x_NH.new_empty(0, hidden)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_NH: torch.Tensor):
        x_NH, w1_EF1H, w2_EHF, probs_N, b2_EH, *saved = ctx.saved_tensors
        need_x, need_w1, need_w2, need_p, need_b1, need_b2 = ctx.needs_input_grad[:6]
        need_h = need_x or need_w1 or need_b1  # the gradient reaches fc1's output
        need_s = need_h or need_p
        grad_NH = grad_NH.contiguous()  # e.g. the stride-0 gradient of out.sum()
        grad_x = torch.empty_like(x_NH) if need_x else None
        grad_w1 = torch.empty_like(w1_EF1H, memory_format=torch.contiguous_format) if need_w1 else None
        grad_w2 = torch.empty_like(w2_EHF, memory_format=torch.contiguous_format) if need_w2 else None
        grad_p = probs_N.new_empty(probs_N.shape) if need_p else None
        # Bias gradients accumulate per run (zero for experts without rows). fc2's bias term
        # b2 * p is differentiated in its promoted dtype, as autograd does for the reference.
        grad_b1 = x_NH.new_zeros(ctx.b1_shape[0], dtype=ctx.b1_shape[1]) if need_b1 else None
        bias_dtype = torch.promote_types(b2_EH.dtype, probs_N.dtype) if b2_EH is not None else None
        grad_b2 = x_NH.new_zeros(b2_EH.shape, dtype=bias_dtype) if need_b2 else None
        grad_p_bias = probs_N.new_zeros(probs_N.shape) if need_p and b2_EH is not None else None

        for b, (start, end, runs) in enumerate(ctx.blocks):
            h_BF1, a_BF, s_BF = saved[3 * b:3 * b + 3]
            grad_s_BF = s_BF.new_empty(s_BF.shape) if need_s else None
            with _untraced():
                for e, k, lo, m, continues in runs:
                    hi = lo + k * m
                    g_KMH = grad_NH[lo:hi].view(k, m, -1)
                    if need_s:
                        torch.bmm(g_KMH, w2_EHF[e:e + k], out=grad_s_BF[lo - start:hi - start].view(k, m, -1))
                    if need_w2:
                        s_KMF = s_BF[lo - start:hi - start].view(k, m, -1)
                        _bmm_into(grad_w2[e:e + k], g_KMH.transpose(1, 2), s_KMF, continues)
                    if need_b2 or grad_p_bias is not None:
                        g_KMH_b = g_KMH.to(bias_dtype)
                        if need_b2:
                            grad_b2[e:e + k] += (g_KMH_b * probs_N[lo:hi].view(k, m, 1)).sum(1)
                        if grad_p_bias is not None:
                            grad_p_bias[lo:hi] = (g_KMH_b * b2_EH[e:e + k].unsqueeze(1)).sum(-1).view(-1)
            # s = (a * p).to(a.dtype), differentiated as autograd does for the eager reference: in
            # the promoted dtype of a and p, each result rounded once to its tensor's dtype.
            if need_p:
                compute = torch.promote_types(a_BF.dtype, probs_N.dtype)
                grad_p[start:end] = (grad_s_BF.to(compute) * a_BF).sum(-1)
            if not need_h:
                continue
            grad_a_BF = grad_s_BF.mul_(probs_N[start:end].unsqueeze(-1))  # grad_s is not needed any more
            # retain_graph: a second backward through the caller's graph (retain_graph=True there)
            # needs it again; it is freed with this node's saved tensors either way.
            (grad_h_BF1,) = torch.autograd.grad(a_BF, h_BF1, grad_a_BF, retain_graph=True, allow_unused=True)
            if grad_h_BF1 is None:  # an activation that ignores its input
                grad_h_BF1 = torch.zeros_like(h_BF1)
            with _untraced():
                for e, k, lo, m, continues in runs:
                    hi = lo + k * m
                    grad_h_KMF1 = grad_h_BF1[lo - start:hi - start].view(k, m, -1)
                    if need_b1:
                        grad_b1[e:e + k] += grad_h_KMF1.sum(1)
                    if need_x:
                        torch.bmm(grad_h_KMF1, w1_EF1H[e:e + k], out=grad_x[lo:hi].view(k, m, -1))
                    if need_w1:
                        _bmm_into(grad_w1[e:e + k], grad_h_KMF1.transpose(1, 2), x_NH[lo:hi].view(k, m, -1), continues)

        with _untraced():  # experts without rows
            for grad_w in (grad_w1, grad_w2):
                if grad_w is not None:
                    for e, c in enumerate(ctx.counts):
                        if c == 0:
                            grad_w[e].zero_()
        if grad_p_bias is not None:
            grad_p += grad_p_bias
        if grad_b2 is not None:
            grad_b2 = grad_b2.to(b2_EH.dtype)
        return grad_x, grad_w1, grad_w2, grad_p, grad_b1, grad_b2, None, None, None, None


def expert_mlp_segmented(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
    *,
    b1_EF1: torch.Tensor | None = None,
    b2_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert matmuls on row segments inside ONE autograd node: no padding, no row gather, no
    per-expert autograd graph (what costs SequentialMLP and the ``loop`` kernel most with hundreds
    of small experts), and a handful of elementwise calls whatever the number of experts."""
    counts = [int(c) for c in tokens_per_expert]
    if len(counts) != w1_EF1H.shape[0] or sum(counts) != x_NH.shape[0]:
        raise ValueError(
            f"tokens_per_expert has {len(counts)} counts summing to {sum(counts)}; expected {w1_EF1H.shape[0]} "
            f"experts and {x_NH.shape[0]} rows"
        )
    grad_to_fc1 = torch.is_grad_enabled() and (
        x_NH.requires_grad or w1_EF1H.requires_grad or (b1_EF1 is not None and b1_EF1.requires_grad)
    )
    return _SegmentedExpertMLP.apply(
        x_NH.contiguous(), w1_EF1H, w2_EHF, probs_N.contiguous(), b1_EF1, b2_EH, counts, activation, grad_to_fc1,
        SEGMENTED_BLOCK_ELEMENTS,
    )


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
    *,
    b1_EF1: torch.Tensor | None = None,
    b2_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched matmul over experts padded to the largest count (exact: padding rows are zero,
    with probability zero, and dropped). One bmm per projection instead of 2E small matmuls;
    balanced routing pads nothing."""
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
    h_EMF1 = torch.bmm(x_EMH, w1_EF1H.transpose(1, 2))
    if b1_EF1 is not None:
        h_EMF1 = h_EMF1 + b1_EF1.unsqueeze(1)
    h_EMF = activation(h_EMF1)
    h_EMF = (h_EMF * p_EM1).to(h_EMF.dtype)
    out_EMH = torch.bmm(h_EMF, w2_EHF.transpose(1, 2))
    if b2_EH is not None:
        out_EMH = (out_EMH + b2_EH.unsqueeze(1) * p_EM1).to(out_EMH.dtype)
    out_XH = out_EMH.reshape(num_experts * m, -1)
    return out_XH if dest_N is None else out_XH.index_select(0, dest_N)


def expert_of_rows(tokens_per_expert: Sequence[int], device: torch.device) -> torch.Tensor:
    """[N] each grouped row's expert index (to gather per-row biases)."""
    counts_E = torch.tensor(list(tokens_per_expert), dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(counts_E), device=device), counts_E)


def expert_mlp_grouped_mm(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
    *,
    b1_EF1: torch.Tensor | None = None,
    b2_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch._grouped_mm`` (CUDA grouped GEMM; no padding). On CPU it exists but is slower than
    the padded bmm and its backward rejects stride-0 gradients, so the module uses it on CUDA only.
    Biases are gathered per row (the grouped GEMM takes none)."""
    offs_E = torch.cumsum(torch.tensor(list(tokens_per_expert), device=x_NH.device), 0).to(torch.int32)
    expert_N = expert_of_rows(tokens_per_expert, x_NH.device) if b1_EF1 is not None or b2_EH is not None else None
    h_NF1 = torch._grouped_mm(x_NH, w1_EF1H.transpose(1, 2), offs=offs_E)
    if b1_EF1 is not None:
        h_NF1 = h_NF1 + b1_EF1[expert_N]
    h_NF = activation(h_NF1)
    h_NF = (h_NF * probs_N.unsqueeze(-1)).to(h_NF.dtype)
    out_NH = torch._grouped_mm(h_NF, w2_EHF.transpose(1, 2), offs=offs_E)
    return out_NH if b2_EH is None else _add_scaled_bias(out_NH, b2_EH[expert_N], probs_N)


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
    *,
    b1_EF1: torch.Tensor | None = None,
    b2_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """The default: torch's grouped GEMM where it can run (CUDA), the segmented kernel otherwise.

    On CPU the segmented kernel at every expert size, replacing the per-expert loop (expert size
    >= 256) and the padded batched matmul (below), which pads every expert to the largest one and
    gathers all rows forward and backward. Measured on the shared 2-core VM, fp32 fwd+bwd, hidden
    512, 4096 tokens, k0=1, E=8, two threads, under the CPU runtime. Kernels alone (min of 5, ms,
    loop / padded / segmented): exactly balanced rows G=1 (8 x 2048) 367 / 437 / 385, G=16
    (128 x 128) 574 / 539 / 459, G=64 (512 x 32) 1104 / 822 / 787; near-balanced (max/mean
    1.05-1.13) G=1 361 / 474 / 395, G=16 594 / 897 / 535, G=64 1218 / 2239 / 966 (one thread:
    loop and segmented equal at G=1, 698 / 700 ms). Speed-up over SequentialMLP at G = 1 / 4 / 8 /
    16 / 64 (benchmarks/bench_fine_grained.py): experts 0.96 / 1.07 / 1.03 / 1.19 / 1.53x, MoELayer
    0.96 / 1.04 / 1.09 / 1.06 / 1.15x, against 0.94 / 1.10 / 0.97 / 1.13 / 1.66x and 0.86 / 0.99 /
    1.09 / 0.80 / 0.79x for the former choice (benchmarks/RESULTS.md, second run)."""
    if grouped_mm_supported(x_NH, w1_EF1H, w2_EHF):
        return expert_mlp_grouped_mm(x_NH, tokens_per_expert, w1_EF1H, w2_EHF, probs_N, activation,
                                     b1_EF1=b1_EF1, b2_EH=b2_EH)
    return expert_mlp_segmented(x_NH, tokens_per_expert, w1_EF1H, w2_EHF, probs_N, activation,
                                b1_EF1=b1_EF1, b2_EH=b2_EH)


def expert_mlp_te(
    x_NH: torch.Tensor,
    tokens_per_expert: Sequence[int],
    w1_EF1H: torch.Tensor,
    w2_EHF: torch.Tensor,
    probs_N: torch.Tensor,
    activation: Activation,
    *,
    b1_EF1: torch.Tensor | None = None,
    b2_EH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Transformer Engine grouped GEMMs (FP8 under a TE autocast), ``kernels/te_grouped.py``. Imported
    on the first call, so importing this module never imports Transformer Engine."""
    from megatron_moe_ext.kernels.te_grouped import expert_mlp_te as impl

    return impl(x_NH, tokens_per_expert, w1_EF1H, w2_EHF, probs_N, activation, b1_EF1=b1_EF1, b2_EH=b2_EH)


EXPERT_MLP_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": expert_mlp_eager,
    "loop": expert_mlp_loop,
    "padded": expert_mlp_padded,
    "segmented": expert_mlp_segmented,
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
