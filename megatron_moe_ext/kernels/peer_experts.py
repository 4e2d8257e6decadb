"""PEER expert compute (He 2024, arXiv 2407.04153): single-neuron experts gathered per token.

out[t] = sum over the pairs p of token t of  g_p * act(u[e_p] . x[t]) * v[e_p]

The selected (token, expert) pairs come in token-major CSR form: ``offsets_T1`` [T+1] delimits
each token's run of pairs in ``ids_P`` (expert rows of the tables) and ``gates_P``. A single rank
has exactly K = heads * k pairs per token (``offsets = arange(T+1) * K``); a rank owning a shard
of the tables gets only the pairs of its own experts, so runs are ragged.

Backends (selected by name; all equal the reference, forward and backward):
- ``eager``: the reference (``kernels/peer_reference.py``: pure torch, also shipped with Hugging Face
  exports). Gathers u and v rows for every pair under autograd, so it keeps [P, h] tensors alive
  from forward to backward (P = T*K): the naive path of public code.
- ``chunked``: one autograd function over chunks of pairs, saving only the inputs and
  recomputing each chunk's gathers in backward: extra memory O(chunk * h), independent of T.
- ``embedding_bag``: the v side through ``F.embedding_bag(per_sample_weights=...)`` (no [P, h] on
  that side), the u side gathered under autograd.
- ``cpu_fused``: a fused C++ kernel for CPUs (``kernels/peer_cpu.py``, fp32, built on first use).
- ``triton``: the fused GPU kernel (``kernels/peer_triton.py``).

Table gradients: a dense [N, h] gradient per backward would cost as much as the table itself
(2 GiB per table at N = 1M, h = 512, fp32). Under Megatron's DDP a parameter carries
``main_grad`` (its slot in the fp32 grad buffer): ``chunked`` adds its row gradients straight
into it and hands autograd an uninitialised placeholder flagged ``grad_added_to_main_grad``, the
protocol of Megatron's gradient-accumulation fusion (DDP's hook then skips the add).

Legend: T tokens, h hidden size, N table rows (local shard), P selected pairs, C pairs of a chunk.
Kernels see tensors, never a config.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F

from megatron_moe_ext.kernels.peer_reference import (  # noqa: F401  (re-exported: the public names of this module)
    ACTIVATIONS,
    _compute_dtype,
    pair_tokens,
    peer_experts_reference,
    peer_gates,
    uniform_offsets,
)
from megatron_moe_ext.kernels.peer_common import (  # noqa: F401  (re-exported)
    _table_grad_result,
    _table_grad_target,
    check_inputs,
)
from megatron_moe_ext.settings.peer import PEER_BACKENDS

Tensor = torch.Tensor

BACKENDS = PEER_BACKENDS  # one list for the kernels and the --moe-peer-backend choices
DEFAULT_CHUNK_PAIRS = 16384


def activation_grad(name: str, s: Tensor) -> Tensor:
    """d act(s) / ds for the named activation (exact erf GELU, as ``F.gelu``)."""
    if name == "relu":
        return (s > 0).to(s.dtype)
    if name == "silu":
        sig = torch.sigmoid(s)
        return sig * (1 + s * (1 - sig))
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(s * 0.7071067811865476))
        pdf = torch.exp(-0.5 * s * s) * 0.3989422804014327
        return cdf + s * pdf
    raise ValueError(f"activation {name!r} is unknown; choose from {', '.join(ACTIVATIONS)}")


def _token_chunks(offsets_T1: Tensor, chunk_pairs: int) -> list[tuple[int, int, int, int]]:
    """(t0, t1, p0, p1): runs of whole tokens holding at most ``chunk_pairs`` pairs (or one token),
    so every token's output row is finished inside one chunk (no scatter across chunks)."""
    offs = offsets_T1.tolist()
    chunks, t0, T = [], 0, len(offs) - 1
    while t0 < T:
        t1 = max(bisect.bisect_right(offs, offs[t0] + chunk_pairs, lo=t0 + 1) - 1, t0 + 1)
        chunks.append((t0, t1, offs[t0], offs[t1]))
        t0 = t1
    return chunks


def _uniform_width(offsets_T1: Tensor) -> int:
    """K when every token has exactly K pairs (a single rank), else 0 (ragged shard)."""
    T = offsets_T1.numel() - 1
    if T == 0:
        return 0
    K = int(offsets_T1[1] - offsets_T1[0])
    uniform = K > 0 and bool(torch.equal(offsets_T1, torch.arange(T + 1, device=offsets_T1.device) * K))
    return K if uniform else 0


class _Chunk:
    """One token chunk: per-pair dot products, outer products and per-token weighted sums, as
    batched matmuls when every token has K pairs, through the pairs' local token index otherwise."""

    def __init__(self, t0: int, t1: int, p0: int, p1: int, K: int, offsets_T1: Tensor, tok_P: Tensor | None) -> None:
        self.t0, self.t1, self.p0, self.p1, self.K = t0, t1, p0, p1, K
        self.bag_offsets = offsets_T1[t0:t1] - p0
        self.tok_C = None if K else tok_P[p0:p1] - t0

    def dots(self, rows_Ch: Tensor, vec_Th: Tensor) -> Tensor:
        """rows[p] . vec[token(p)] for each pair, [C]."""
        vec = vec_Th[self.t0:self.t1].to(rows_Ch.dtype)
        if self.K:
            return torch.bmm(rows_Ch.view(-1, self.K, rows_Ch.shape[1]), vec.unsqueeze(-1)).view(-1)
        return (rows_Ch * vec.index_select(0, self.tok_C)).sum(-1)

    def outer(self, w_C: Tensor, vec_Th: Tensor) -> Tensor:
        """w[p] * vec[token(p)] for each pair, [C, h]: the pairs' table-row gradients."""
        vec = vec_Th[self.t0:self.t1].to(w_C.dtype)
        if self.K:
            return (w_C.view(-1, self.K, 1) * vec.unsqueeze(1)).view(-1, vec.shape[1])
        return w_C.unsqueeze(-1) * vec.index_select(0, self.tok_C)

    def bag(self, w_C: Tensor, rows_Ch: Tensor) -> Tensor:
        """sum over each token's pairs of w[p] * rows[p], [t1 - t0, h]."""
        if self.K:
            return torch.bmm(w_C.view(-1, 1, self.K), rows_Ch.view(-1, self.K, rows_Ch.shape[1])).view(-1, rows_Ch.shape[1])
        out = rows_Ch.new_zeros(self.t1 - self.t0, rows_Ch.shape[1])
        return out.index_add_(0, self.tok_C, w_C.unsqueeze(-1) * rows_Ch)

    def table_bag(self, w_C: Tensor, table: Tensor, ids_C: Tensor) -> Tensor:
        """``bag`` of table rows without gathering them (embedding_bag) when dtypes allow."""
        if table.dtype == w_C.dtype:
            return F.embedding_bag(ids_C, table, self.bag_offsets, mode="sum", per_sample_weights=w_C)
        return self.bag(w_C, table.index_select(0, ids_C).to(w_C.dtype))


class _ChunkedPeer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation, chunk):  # type: ignore[override]
        act = ACTIVATIONS[activation]
        cdt = _compute_dtype(x_Th)
        K = _uniform_width(offsets_T1)
        tok_P = None if K else pair_tokens(offsets_T1, ids_P.numel())
        out_Th = torch.zeros_like(x_Th)
        # The pre-activations are kept ([P] scalars, not [P, h]): backward then needs no u rows
        # gathered, only summed (embedding_bag) for the input gradient.
        s_P = torch.empty(ids_P.shape, dtype=cdt, device=x_Th.device)
        chunks = [_Chunk(*c, K, offsets_T1, tok_P) for c in _token_chunks(offsets_T1, chunk)]
        for c in chunks:
            if c.p1 == c.p0:
                continue
            ids_C = ids_P[c.p0:c.p1]
            s_C = c.dots(u_Nh.index_select(0, ids_C).to(cdt), x_Th)
            s_P[c.p0:c.p1] = s_C
            z_C = act(s_C) * gates_P[c.p0:c.p1].to(cdt)
            out_Th[c.t0:c.t1] = c.table_bag(z_C, v_Nh, ids_C).to(x_Th.dtype)
        ctx.save_for_backward(x_Th, u_Nh, v_Nh, ids_P, gates_P, s_P)
        ctx.chunks, ctx.activation = chunks, activation
        return out_Th

    @staticmethod
    def backward(ctx, grad_Th):  # type: ignore[override]
        x_Th, u_Nh, v_Nh, ids_P, gates_P, s_P = ctx.saved_tensors
        act = ACTIVATIONS[ctx.activation]
        cdt = _compute_dtype(x_Th)
        need_x, need_u, need_v, _, need_g = ctx.needs_input_grad[:5]
        du_buf, du_fused = _table_grad_target(u_Nh) if need_u else (None, False)
        dv_buf, dv_fused = _table_grad_target(v_Nh) if need_v else (None, False)
        dx_Th = torch.zeros_like(x_Th) if need_x else None
        dg_P = torch.zeros_like(gates_P) if need_g else None
        grad_Th = grad_Th.contiguous()
        for c in ctx.chunks:
            if c.p1 == c.p0:
                continue
            ids_C = ids_P[c.p0:c.p1]
            s_C = s_P[c.p0:c.p1]
            a_C = act(s_C)
            g_C = gates_P[c.p0:c.p1].to(cdt)
            dz_C = c.dots(v_Nh.index_select(0, ids_C).to(cdt), grad_Th)  # d out / d z of each pair
            if need_g:
                dg_P[c.p0:c.p1] = (dz_C * a_C).to(dg_P.dtype)
            if need_v:
                dv_buf.index_add_(0, ids_C, c.outer(a_C * g_C, grad_Th).to(dv_buf.dtype))
            ds_C = dz_C * g_C * activation_grad(ctx.activation, s_C)
            if need_x:
                dx_Th[c.t0:c.t1] = c.table_bag(ds_C, u_Nh, ids_C).to(dx_Th.dtype)
            if need_u:
                du_buf.index_add_(0, ids_C, c.outer(ds_C, x_Th).to(du_buf.dtype))
        du = _table_grad_result(u_Nh, du_buf, du_fused) if need_u else None
        dv = _table_grad_result(v_Nh, dv_buf, dv_fused) if need_v else None
        return dx_Th, du, dv, None, dg_P, None, None, None


def peer_experts_chunked(x_Th: Tensor, u_Nh: Tensor, v_Nh: Tensor, ids_P: Tensor, gates_P: Tensor, offsets_T1: Tensor, activation: str = "gelu", chunk_pairs: int = DEFAULT_CHUNK_PAIRS) -> Tensor:
    """Memory-lean path: runs of tokens holding about ``chunk_pairs`` pairs at a time, nothing of
    size [P, h] kept between forward and backward (gathers recomputed in backward). Single-rank
    (uniform) pairs use batched matmuls for the per-token dots and sums; the v side of forward
    is an ``embedding_bag`` with per-pair weights (no gathered v rows) when dtypes match."""
    if chunk_pairs < 1:
        raise ValueError(f"chunk_pairs={chunk_pairs} must be >= 1; fix: pass e.g. {DEFAULT_CHUNK_PAIRS}")
    return _ChunkedPeer.apply(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation, chunk_pairs)


def peer_experts_embedding_bag(x_Th: Tensor, u_Nh: Tensor, v_Nh: Tensor, ids_P: Tensor, gates_P: Tensor, offsets_T1: Tensor, activation: str = "gelu") -> Tensor:
    """u side gathered under autograd; v side summed by ``embedding_bag`` with per-pair weights."""
    tok_P = pair_tokens(offsets_T1, ids_P.numel())
    s_P = (u_Nh[ids_P] * x_Th[tok_P]).sum(-1)
    cdt = _compute_dtype(x_Th)
    z_P = ACTIVATIONS[activation](s_P.to(cdt)) * gates_P.to(cdt)
    out_Th = F.embedding_bag(ids_P, v_Nh, offsets_T1[:-1], mode="sum", per_sample_weights=z_P.to(v_Nh.dtype), include_last_offset=False)
    return out_Th.to(x_Th.dtype)


def resolve_backend(backend: str, x_Th: Tensor, u_Nh: Tensor) -> str:
    """``auto``: the Triton kernel on CUDA when Triton imports; on CPU the fused C++ kernel for fp32
    (when a compiler is there), else ``chunked``."""
    if backend not in BACKENDS:
        raise ValueError(f"PEER backend {backend!r} is unknown; choose from {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if x_Th.device.type == "cuda":
        from megatron_moe_ext.kernels import peer_triton

        if peer_triton.available():
            return "triton"
    elif x_Th.dtype == torch.float32 and u_Nh.dtype == torch.float32 and u_Nh.is_contiguous():
        from megatron_moe_ext.kernels import peer_cpu

        if peer_cpu.available():
            return "cpu_fused"
    return "chunked"


def peer_experts(
    x_Th: Tensor,
    u_Nh: Tensor,
    v_Nh: Tensor,
    ids_P: Tensor,
    gates_P: Tensor,
    offsets_T1: Tensor,
    activation: str = "gelu",
    *,
    backend: str = "auto",
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
    deterministic: bool = False,
) -> Tensor:
    """PEER experts by backend name (see the module docstring); out [T, h] in x's dtype."""
    check_inputs(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation)
    name = resolve_backend(backend, x_Th, u_Nh)
    if name == "eager":
        return peer_experts_reference(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation)
    if name == "chunked":
        return peer_experts_chunked(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation, chunk_pairs)
    if name == "embedding_bag":
        return peer_experts_embedding_bag(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation)
    if name == "cpu_fused":
        from megatron_moe_ext.kernels import peer_cpu

        return peer_cpu.peer_experts_cpu(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation)
    from megatron_moe_ext.kernels import peer_triton

    return peer_triton.peer_experts_triton(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation, deterministic=deterministic)
