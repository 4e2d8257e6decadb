"""PEER expert compute (He 2024, arXiv 2407.04153): single-neuron experts gathered per token.

out[t] = sum over the pairs p of token t of  g_p * act(u[e_p] . x[t]) * v[e_p]

The selected (token, expert) pairs come in token-major CSR form: ``offsets_T1`` [T+1] delimits
each token's run of pairs in ``ids_P`` (expert rows of the tables) and ``gates_P``. A single rank
has exactly K = heads * k pairs per token (``offsets = arange(T+1) * K``); a rank owning a shard
of the tables gets only the pairs of its own experts, so runs are ragged.

Backends (selected by name; all equal the reference, forward and backward):
- ``eager``: the reference. Gathers u and v rows for every pair under autograd, so it keeps
  [P, h] tensors alive from forward to backward (P = T*K): the naive path of public code.
- ``chunked``: one autograd function over chunks of pairs, saving only the inputs and
  recomputing each chunk's gathers in backward: extra memory O(chunk * h), independent of T.
- ``embedding_bag``: the v side through ``F.embedding_bag(per_sample_weights=...)`` (no [P, h] on
  that side), the u side gathered under autograd.
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

from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
BACKENDS = ("auto", "eager", "chunked", "embedding_bag", "triton")
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


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Activations and gates in fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


def pair_tokens(offsets_T1: Tensor, num_pairs: int) -> Tensor:
    """Token index of every pair, [P] int64, from the CSR offsets."""
    counts_T = offsets_T1[1:] - offsets_T1[:-1]
    return torch.repeat_interleave(torch.arange(counts_T.numel(), device=offsets_T1.device), counts_T, output_size=num_pairs)


def uniform_offsets(num_tokens: int, per_token: int, device: torch.device | str) -> Tensor:
    """CSR offsets of ``per_token`` pairs for each of ``num_tokens`` tokens."""
    return torch.arange(num_tokens + 1, device=device, dtype=torch.int64) * per_token


def check_inputs(x_Th: Tensor, u_Nh: Tensor, v_Nh: Tensor, ids_P: Tensor, gates_P: Tensor, offsets_T1: Tensor, activation: str) -> None:
    """Shapes and dtypes every backend relies on (ValueError naming the values)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is unknown; choose from {', '.join(ACTIVATIONS)}")
    if x_Th.dim() != 2 or u_Nh.dim() != 2 or u_Nh.shape != v_Nh.shape or u_Nh.shape[1] != x_Th.shape[1]:
        raise ValueError(f"x {tuple(x_Th.shape)}, u {tuple(u_Nh.shape)}, v {tuple(v_Nh.shape)}: expected x [T, h] and "
                         "u, v [N, h] with the same h")
    if ids_P.dim() != 1 or gates_P.shape != ids_P.shape:
        raise ValueError(f"ids {tuple(ids_P.shape)} and gates {tuple(gates_P.shape)} must both be [P]")
    if offsets_T1.shape != (x_Th.shape[0] + 1,):
        raise ValueError(f"offsets {tuple(offsets_T1.shape)} must be [T+1] = [{x_Th.shape[0] + 1}]")


def peer_experts_reference(x_Th: Tensor, u_Nh: Tensor, v_Nh: Tensor, ids_P: Tensor, gates_P: Tensor, offsets_T1: Tensor, activation: str = "gelu") -> Tensor:
    """The semantics: gather, dot, activate, scale, scatter-add, all under autograd."""
    tok_P = pair_tokens(offsets_T1, ids_P.numel())
    s_P = (u_Nh[ids_P] * x_Th[tok_P]).sum(-1)
    z_P = ACTIVATIONS[activation](s_P) * gates_P
    out_Th = x_Th.new_zeros(x_Th.shape)
    return out_Th.index_add(0, tok_P, (z_P.unsqueeze(-1) * v_Nh[ids_P]).to(x_Th.dtype))


def _table_grad_target(table: Tensor) -> tuple[Tensor, bool]:
    """Where a table's row gradients go: its main_grad under Megatron DDP (fused accumulation), else
    a new zero tensor returned to autograd."""
    main_grad = getattr(table, "main_grad", None)
    if main_grad is not None and hasattr(table, "grad_added_to_main_grad"):
        return main_grad, True
    return torch.zeros_like(table), False


def _table_grad_result(table: Tensor, buf: Tensor, fused: bool) -> Tensor:
    if not fused:
        return buf
    table.grad_added_to_main_grad = True
    # DDP's hook skips this placeholder (grad_added_to_main_grad); empty() touches no memory.
    return torch.empty(table.shape, dtype=table.dtype, device=table.device)


class _ChunkedPeer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation, chunk):  # type: ignore[override]
        act = ACTIVATIONS[activation]
        cdt = _compute_dtype(x_Th)
        P = ids_P.numel()
        tok_P = pair_tokens(offsets_T1, P)
        out_Th = torch.zeros_like(x_Th)
        for start in range(0, P, chunk):
            ids_C, tok_C = ids_P[start:start + chunk], tok_P[start:start + chunk]
            s_C = (u_Nh[ids_C] * x_Th[tok_C]).sum(-1)
            z_C = act(s_C.to(cdt)) * gates_P[start:start + chunk].to(cdt)
            out_Th.index_add_(0, tok_C, (z_C.unsqueeze(-1).to(v_Nh.dtype) * v_Nh[ids_C]).to(x_Th.dtype))
        ctx.save_for_backward(x_Th, u_Nh, v_Nh, ids_P, gates_P, tok_P)
        ctx.activation, ctx.chunk = activation, chunk
        return out_Th

    @staticmethod
    def backward(ctx, grad_Th):  # type: ignore[override]
        x_Th, u_Nh, v_Nh, ids_P, gates_P, tok_P = ctx.saved_tensors
        act = ACTIVATIONS[ctx.activation]
        cdt = _compute_dtype(x_Th)
        need_x, need_u, need_v, _, need_g = ctx.needs_input_grad[:5]
        du_buf, du_fused = _table_grad_target(u_Nh) if need_u else (None, False)
        dv_buf, dv_fused = _table_grad_target(v_Nh) if need_v else (None, False)
        dx_Th = torch.zeros_like(x_Th) if need_x else None
        dg_P = torch.empty_like(gates_P) if need_g else None
        P, chunk = ids_P.numel(), ctx.chunk
        for start in range(0, P, chunk):
            sl = slice(start, start + chunk)
            ids_C, tok_C = ids_P[sl], tok_P[sl]
            U_Ch, V_Ch, X_Ch, dy_Ch = u_Nh[ids_C], v_Nh[ids_C], x_Th[tok_C], grad_Th[tok_C]
            s_C = (U_Ch * X_Ch).sum(-1).to(cdt)
            a_C = act(s_C)
            g_C = gates_P[sl].to(cdt)
            dz_C = (dy_Ch * V_Ch).sum(-1).to(cdt)  # d out / d z for each pair
            if need_g:
                dg_P[sl] = (dz_C * a_C).to(dg_P.dtype)
            if need_v:
                dv_buf.index_add_(0, ids_C, ((a_C * g_C).unsqueeze(-1) * dy_Ch.to(cdt)).to(dv_buf.dtype))
            ds_C = dz_C * g_C * activation_grad(ctx.activation, s_C)
            if need_x:
                dx_Th.index_add_(0, tok_C, (ds_C.unsqueeze(-1) * U_Ch.to(cdt)).to(dx_Th.dtype))
            if need_u:
                du_buf.index_add_(0, ids_C, (ds_C.unsqueeze(-1) * X_Ch.to(cdt)).to(du_buf.dtype))
        du = _table_grad_result(u_Nh, du_buf, du_fused) if need_u else None
        dv = _table_grad_result(v_Nh, dv_buf, dv_fused) if need_v else None
        return dx_Th, du, dv, None, dg_P, None, None, None


def peer_experts_chunked(x_Th: Tensor, u_Nh: Tensor, v_Nh: Tensor, ids_P: Tensor, gates_P: Tensor, offsets_T1: Tensor, activation: str = "gelu", chunk_pairs: int = DEFAULT_CHUNK_PAIRS) -> Tensor:
    """Memory-lean path: ``chunk_pairs`` pairs at a time, gathers recomputed in backward."""
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


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: the Triton kernel on CUDA when Triton imports, else ``chunked``."""
    if backend not in BACKENDS:
        raise ValueError(f"PEER backend {backend!r} is unknown; choose from {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        from megatron_moe_ext.kernels import peer_triton

        if peer_triton.available():
            return "triton"
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
    name = resolve_backend(backend, x_Th.device)
    if name == "eager":
        return peer_experts_reference(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation)
    if name == "chunked":
        return peer_experts_chunked(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation, chunk_pairs)
    if name == "embedding_bag":
        return peer_experts_embedding_bag(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation)
    from megatron_moe_ext.kernels import peer_triton

    return peer_triton.peer_experts_triton(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation, deterministic=deterministic)
