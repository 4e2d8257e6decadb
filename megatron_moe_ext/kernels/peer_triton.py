"""Fused Triton kernels for the PEER expert compute (semantics: ``peer_experts.peer_experts_reference``).

out[t] = sum over the pairs p of token t of  g_p * act(u[e_p] . x[t]) * v[e_p]

Legend: T tokens, h hidden size, N table rows (local shard), P selected (token, expert) pairs,
S runs of equal expert id among the pairs (segments, deterministic backward only).
Pairs are token-major CSR: ``offsets_T1`` [T+1] delimits each token's run in ``ids_P`` / ``gates_P``;
runs may be ragged or empty.

Kernel design
-------------
* Forward (``_peer_fwd_kernel``, one program per token): loops over the token's pairs in blocks
  of BLOCK_P; per block it gathers the [BLOCK_P, h] u rows, dots them with x[t] (fp32), applies the
  activation and the gate, gathers the v rows and accumulates the output row in fp32. No [P, h]
  tensor ever exists, and autograd saves only the inputs (the backward recomputes the dots).
* Backward, per token (``_peer_bwd_token_kernel``, one program per token): recomputes
  s_p = u[e_p] . x[t] and dz_p = dy[t] . v[e_p]; writes dgates_p = dz_p * act(s_p) (each pair
  belongs to one token, so no race); accumulates dx[t] = sum_p ds_p * u[e_p] with
  ds_p = dz_p * g_p * act'(s_p) in fp32 in the program that owns the row. The table gradients
  du[e_p] += ds_p * x[t] and dv[e_p] += g_p * act(s_p) * dy[t] go either
  - by ``tl.atomic_add`` into fp32 buffers straight from this kernel (default: one pass, fastest,
    but the fp32 summation order of a row shared by several pairs varies run to run), or
  - (``deterministic=True``) into two per-pair scalars ds_P and w_P = g*act(s) ([P] fp32, cheap),
    after which the pairs are stably sorted by expert id and ``_peer_bwd_table_kernel`` runs one
    program per (segment of equal id, block of h): it sums its pairs in sorted order (the stable
    sort keeps the original pair order inside a segment) and writes its row once. No atomics, so
    the result is bitwise reproducible.
* h: BLOCK_H = next power of two of h, capped at ``MAX_BLOCK_H``. When h fits one block, the x row
  and the accumulator live in registers. Above the cap (e.g. h = 4096) the kernels loop over
  h-blocks: a first loop finishes the full-h dots (an activation needs the whole dot), a second
  loop does the row updates, read-modify-writing the fp32 accumulator row in global memory; the
  row is owned by the program, so this is race-free (it stays in L1/L2).
* All arithmetic is fp32 whatever the storage dtype (bf16 / fp16 / fp32); results are cast on the
  final store.
* Table gradients follow Megatron's fused main_grad protocol through ``_table_grad_target`` /
  ``_table_grad_result``; accumulation always happens in an fp32 buffer (main_grad itself when it
  is contiguous fp32, else a scratch buffer converted at the end).

Runs on CUDA, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported), which is how the unit tests check it without a GPU.
"""

from __future__ import annotations

import os

import torch

from megatron_moe_ext.kernels.peer_common import _table_grad_result, _table_grad_target, check_inputs
from megatron_moe_ext.kernels.peer_reference import ACTIVATIONS, pair_tokens

try:  # Triton is optional: the module must import (and ``available()`` answer False) without it.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _HAS_TRITON = False

Tensor = torch.Tensor

# Activation codes seen by the kernels (a constexpr, so each activation compiles its own kernel).
_ACT_CODES = {"gelu": 0, "relu": 1, "silu": 2}
# Widest h-block held in registers; wider rows are looped over (keeps register pressure bounded).
MAX_BLOCK_H = 1024
# Elements of one gathered [BLOCK_P, BLOCK_H] tile: bounds registers per program (~64 fp32 per
# thread at 4 warps).
_TILE_ELEMS = 8192
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    """True when Triton imports and can run: a CUDA device, or the interpreter (``TRITON_INTERPRET=1``)."""
    if not _HAS_TRITON:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if _HAS_TRITON:

    @triton.jit
    def _act(s, ACT: tl.constexpr):
        if ACT == 0:  # exact erf GELU, as F.gelu
            a = 0.5 * s * (1.0 + tl.math.erf(s * 0.7071067811865476))
        elif ACT == 1:
            a = tl.maximum(s, 0.0)
        else:
            a = s / (1.0 + tl.exp(-s))
        return a

    @triton.jit
    def _act_grad(s, ACT: tl.constexpr):
        # Same formulas as peer_experts.activation_grad.
        if ACT == 0:
            cdf = 0.5 * (1.0 + tl.math.erf(s * 0.7071067811865476))
            pdf = tl.exp(-0.5 * s * s) * 0.3989422804014327
            d = cdf + s * pdf
        elif ACT == 1:
            d = tl.where(s > 0.0, 1.0, 0.0)
        else:
            sig = 1.0 / (1.0 + tl.exp(-s))
            d = sig * (1.0 + s * (1.0 - sig))
        return d

    @triton.jit
    def _peer_fwd_kernel(
        x_ptr, u_ptr, v_ptr, ids_ptr, gates_ptr, offsets_ptr, out_ptr,
        h, stride_x, stride_u, stride_v, stride_o,
        ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, NUM_HB: tl.constexpr,
    ):
        # int64 row offsets: T*h and N*h overflow int32 at production sizes.
        t = tl.program_id(0).to(tl.int64)
        lo = tl.load(offsets_ptr + t)
        hi = tl.load(offsets_ptr + t + 1)
        offs_h = tl.arange(0, BLOCK_H)
        if NUM_HB == 1:
            # Whole row in registers: x read once, output accumulated in registers.
            mask_h = offs_h < h
            x_h = tl.load(x_ptr + t * stride_x + offs_h, mask=mask_h, other=0.0).to(tl.float32)
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for p0 in range(lo, hi, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                mask_p = offs_p < hi
                e = tl.load(ids_ptr + offs_p, mask=mask_p, other=0)
                g = tl.load(gates_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
                m2 = mask_p[:, None] & mask_h[None, :]
                u_t = tl.load(u_ptr + e[:, None] * stride_u + offs_h[None, :], mask=m2, other=0.0).to(tl.float32)
                s = tl.sum(u_t * x_h[None, :], axis=1)
                z = g * _act(s, ACT)  # masked pairs: g = 0, so z = 0
                v_t = tl.load(v_ptr + e[:, None] * stride_v + offs_h[None, :], mask=m2, other=0.0).to(tl.float32)
                acc += tl.sum(z[:, None] * v_t, axis=0)
            tl.store(out_ptr + t * stride_o + offs_h, acc, mask=mask_h)
        else:
            # Wide rows: out_ptr is a zeroed fp32 buffer this program owns row t of.
            for p0 in range(lo, hi, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                mask_p = offs_p < hi
                e = tl.load(ids_ptr + offs_p, mask=mask_p, other=0)
                g = tl.load(gates_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
                s = tl.zeros([BLOCK_P], dtype=tl.float32)
                for hb in range(NUM_HB):  # the activation needs the full-h dot first
                    oh = hb * BLOCK_H + offs_h
                    mask_h = oh < h
                    m2 = mask_p[:, None] & mask_h[None, :]
                    x_h = tl.load(x_ptr + t * stride_x + oh, mask=mask_h, other=0.0).to(tl.float32)
                    u_t = tl.load(u_ptr + e[:, None] * stride_u + oh[None, :], mask=m2, other=0.0).to(tl.float32)
                    s += tl.sum(u_t * x_h[None, :], axis=1)
                z = g * _act(s, ACT)
                for hb in range(NUM_HB):
                    oh = hb * BLOCK_H + offs_h
                    mask_h = oh < h
                    m2 = mask_p[:, None] & mask_h[None, :]
                    v_t = tl.load(v_ptr + e[:, None] * stride_v + oh[None, :], mask=m2, other=0.0).to(tl.float32)
                    cur = tl.load(out_ptr + t * stride_o + oh, mask=mask_h, other=0.0)
                    tl.store(out_ptr + t * stride_o + oh, cur + tl.sum(z[:, None] * v_t, axis=0), mask=mask_h)

    @triton.jit
    def _peer_bwd_token_kernel(
        x_ptr, u_ptr, v_ptr, ids_ptr, gates_ptr, offsets_ptr, dy_ptr,
        dx_ptr, dg_ptr, du_ptr, dv_ptr, ds_ptr, w_ptr,
        h, stride_x, stride_u, stride_v, stride_dy, stride_dx, stride_du, stride_dv,
        ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, NUM_HB: tl.constexpr,
        NEED_DX: tl.constexpr, NEED_DG: tl.constexpr, NEED_DU: tl.constexpr, NEED_DV: tl.constexpr,
        ATOMIC_TABLES: tl.constexpr, STORE_PAIR: tl.constexpr,
    ):
        # ATOMIC_TABLES: table grads by atomics here. STORE_PAIR: write ds_P, w_P for the
        # deterministic segment kernel instead (only when a table needs a gradient).
        t = tl.program_id(0).to(tl.int64)
        lo = tl.load(offsets_ptr + t)
        hi = tl.load(offsets_ptr + t + 1)
        offs_h = tl.arange(0, BLOCK_H)
        if NUM_HB == 1:
            mask_h = offs_h < h
            x_h = tl.load(x_ptr + t * stride_x + offs_h, mask=mask_h, other=0.0).to(tl.float32)
            dy_h = tl.load(dy_ptr + t * stride_dy + offs_h, mask=mask_h, other=0.0).to(tl.float32)
            acc = tl.zeros([BLOCK_H], dtype=tl.float32)
            for p0 in range(lo, hi, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                mask_p = offs_p < hi
                e = tl.load(ids_ptr + offs_p, mask=mask_p, other=0)
                g = tl.load(gates_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
                m2 = mask_p[:, None] & mask_h[None, :]
                u_t = tl.load(u_ptr + e[:, None] * stride_u + offs_h[None, :], mask=m2, other=0.0).to(tl.float32)
                v_t = tl.load(v_ptr + e[:, None] * stride_v + offs_h[None, :], mask=m2, other=0.0).to(tl.float32)
                s = tl.sum(u_t * x_h[None, :], axis=1)
                dz = tl.sum(v_t * dy_h[None, :], axis=1)  # d loss / d z_p
                a = _act(s, ACT)
                ds = dz * g * _act_grad(s, ACT)
                w = g * a
                if NEED_DG:
                    tl.store(dg_ptr + offs_p, dz * a, mask=mask_p)
                if NEED_DX:
                    acc += tl.sum(ds[:, None] * u_t, axis=0)
                if ATOMIC_TABLES:
                    if NEED_DU:
                        tl.atomic_add(du_ptr + e[:, None] * stride_du + offs_h[None, :], ds[:, None] * x_h[None, :], mask=m2)
                    if NEED_DV:
                        tl.atomic_add(dv_ptr + e[:, None] * stride_dv + offs_h[None, :], w[:, None] * dy_h[None, :], mask=m2)
                if STORE_PAIR:
                    tl.store(ds_ptr + offs_p, ds, mask=mask_p)
                    tl.store(w_ptr + offs_p, w, mask=mask_p)
            if NEED_DX:
                tl.store(dx_ptr + t * stride_dx + offs_h, acc, mask=mask_h)
        else:
            # Wide rows: dx_ptr is a zeroed fp32 buffer whose row t this program owns.
            for p0 in range(lo, hi, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                mask_p = offs_p < hi
                e = tl.load(ids_ptr + offs_p, mask=mask_p, other=0)
                g = tl.load(gates_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)
                s = tl.zeros([BLOCK_P], dtype=tl.float32)
                dz = tl.zeros([BLOCK_P], dtype=tl.float32)
                for hb in range(NUM_HB):  # full-h dots before any row update
                    oh = hb * BLOCK_H + offs_h
                    mask_h = oh < h
                    m2 = mask_p[:, None] & mask_h[None, :]
                    x_h = tl.load(x_ptr + t * stride_x + oh, mask=mask_h, other=0.0).to(tl.float32)
                    dy_h = tl.load(dy_ptr + t * stride_dy + oh, mask=mask_h, other=0.0).to(tl.float32)
                    u_t = tl.load(u_ptr + e[:, None] * stride_u + oh[None, :], mask=m2, other=0.0).to(tl.float32)
                    v_t = tl.load(v_ptr + e[:, None] * stride_v + oh[None, :], mask=m2, other=0.0).to(tl.float32)
                    s += tl.sum(u_t * x_h[None, :], axis=1)
                    dz += tl.sum(v_t * dy_h[None, :], axis=1)
                a = _act(s, ACT)
                ds = dz * g * _act_grad(s, ACT)
                w = g * a
                if NEED_DG:
                    tl.store(dg_ptr + offs_p, dz * a, mask=mask_p)
                if STORE_PAIR:
                    tl.store(ds_ptr + offs_p, ds, mask=mask_p)
                    tl.store(w_ptr + offs_p, w, mask=mask_p)
                for hb in range(NUM_HB):
                    oh = hb * BLOCK_H + offs_h
                    mask_h = oh < h
                    m2 = mask_p[:, None] & mask_h[None, :]
                    if NEED_DX:
                        u_t = tl.load(u_ptr + e[:, None] * stride_u + oh[None, :], mask=m2, other=0.0).to(tl.float32)
                        cur = tl.load(dx_ptr + t * stride_dx + oh, mask=mask_h, other=0.0)
                        tl.store(dx_ptr + t * stride_dx + oh, cur + tl.sum(ds[:, None] * u_t, axis=0), mask=mask_h)
                    if ATOMIC_TABLES:
                        if NEED_DU:
                            x_h = tl.load(x_ptr + t * stride_x + oh, mask=mask_h, other=0.0).to(tl.float32)
                            tl.atomic_add(du_ptr + e[:, None] * stride_du + oh[None, :], ds[:, None] * x_h[None, :], mask=m2)
                        if NEED_DV:
                            dy_h = tl.load(dy_ptr + t * stride_dy + oh, mask=mask_h, other=0.0).to(tl.float32)
                            tl.atomic_add(dv_ptr + e[:, None] * stride_dv + oh[None, :], w[:, None] * dy_h[None, :], mask=m2)

    @triton.jit
    def _peer_bwd_table_kernel(
        x_ptr, dy_ptr, perm_ptr, tok_ptr, ds_ptr, w_ptr, seg_ids_ptr, seg_offsets_ptr,
        du_ptr, dv_ptr,
        h, stride_x, stride_dy, stride_du, stride_dv,
        BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr, NEED_DU: tl.constexpr, NEED_DV: tl.constexpr,
    ):
        # One program per (segment of pairs sharing an expert row, h-block): the only writer of
        # that slice of the row, summing in the fixed sorted order -> bitwise deterministic.
        seg = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        lo = tl.load(seg_offsets_ptr + seg)
        hi = tl.load(seg_offsets_ptr + seg + 1)
        row = tl.load(seg_ids_ptr + seg)
        oh = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = oh < h
        acc_u = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc_v = tl.zeros([BLOCK_H], dtype=tl.float32)
        for q0 in range(lo, hi, BLOCK_P):
            offs_q = q0 + tl.arange(0, BLOCK_P)
            mask_q = offs_q < hi
            p = tl.load(perm_ptr + offs_q, mask=mask_q, other=0)
            tok = tl.load(tok_ptr + p, mask=mask_q, other=0)
            m2 = mask_q[:, None] & mask_h[None, :]
            if NEED_DU:
                ds = tl.load(ds_ptr + p, mask=mask_q, other=0.0)
                x_t = tl.load(x_ptr + tok[:, None] * stride_x + oh[None, :], mask=m2, other=0.0).to(tl.float32)
                acc_u += tl.sum(ds[:, None] * x_t, axis=0)
            if NEED_DV:
                w = tl.load(w_ptr + p, mask=mask_q, other=0.0)
                dy_t = tl.load(dy_ptr + tok[:, None] * stride_dy + oh[None, :], mask=m2, other=0.0).to(tl.float32)
                acc_v += tl.sum(w[:, None] * dy_t, axis=0)
        # Add (not overwrite): the buffer may be main_grad holding earlier micro-batches' grads.
        if NEED_DU:
            cur = tl.load(du_ptr + row * stride_du + oh, mask=mask_h, other=0.0)
            tl.store(du_ptr + row * stride_du + oh, cur + acc_u, mask=mask_h)
        if NEED_DV:
            cur = tl.load(dv_ptr + row * stride_dv + oh, mask=mask_h, other=0.0)
            tl.store(dv_ptr + row * stride_dv + oh, cur + acc_v, mask=mask_h)


def _blocks(h: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, NUM_HB, BLOCK_P, num_warps) for hidden size h."""
    block_h = min(triton.next_power_of_2(max(h, 1)), MAX_BLOCK_H)
    num_hb = triton.cdiv(h, block_h)
    block_p = max(1, min(32, _TILE_ELEMS // block_h))
    num_warps = 8 if block_h >= 512 else 4
    return block_h, num_hb, block_p, num_warps


def _rows(t: Tensor) -> Tensor:
    """Unit stride along h (the kernels take a row stride only); copies only when needed."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _table_buffers(table: Tensor) -> tuple[Tensor, bool, Tensor]:
    """(target, fused, fp32 work buffer the kernels accumulate into)."""
    target, fused = _table_grad_target(table)
    if target.dtype == torch.float32 and target.stride(-1) == 1:
        return target, fused, target
    # bf16 / fp16 tables (or an odd main_grad): accumulate in fp32, convert once at the end.
    return target, fused, torch.zeros(table.shape, dtype=torch.float32, device=table.device)


def _table_finish(table: Tensor, target: Tensor, fused: bool, work: Tensor) -> Tensor:
    if work is not target:
        if fused:
            target.add_(work.to(target.dtype))
        else:
            target = work.to(table.dtype)
    return _table_grad_result(table, target, fused)


def _forward(x_Th: Tensor, u_Nh: Tensor, v_Nh: Tensor, ids_P: Tensor, gates_P: Tensor, offsets_T1: Tensor, act: int) -> Tensor:
    T, h = x_Th.shape
    block_h, num_hb, block_p, num_warps = _blocks(h)
    if num_hb == 1:
        out_Th = torch.empty_like(x_Th)
    else:  # wide rows accumulate in global memory: needs fp32 and zeros
        out_Th = torch.zeros(x_Th.shape, dtype=torch.float32, device=x_Th.device)
    if T > 0:
        _peer_fwd_kernel[(T,)](
            x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, out_Th,
            h, x_Th.stride(0), u_Nh.stride(0), v_Nh.stride(0), out_Th.stride(0),
            ACT=act, BLOCK_P=block_p, BLOCK_H=block_h, NUM_HB=num_hb, num_warps=num_warps,
        )
    return out_Th.to(x_Th.dtype)


class _TritonPeer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation, deterministic):  # type: ignore[override]
        act = _ACT_CODES[activation]
        out_Th = _forward(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, act)
        ctx.save_for_backward(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1)  # inputs only
        ctx.act, ctx.deterministic = act, deterministic
        return out_Th

    @staticmethod
    def backward(ctx, grad_Th):  # type: ignore[override]
        x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1 = ctx.saved_tensors
        need_x, need_u, need_v, _, need_g = ctx.needs_input_grad[:5]
        T, h = x_Th.shape
        P = ids_P.numel()
        dev = x_Th.device
        dy_Th = _rows(grad_Th)
        block_h, num_hb, block_p, num_warps = _blocks(h)
        atomic = not ctx.deterministic and (need_u or need_v)

        if need_u:
            du_target, du_fused, du_work = _table_buffers(u_Nh)
        if need_v:
            dv_target, dv_fused, dv_work = _table_buffers(v_Nh)
        dx_Th = None
        if need_x:
            dx_Th = torch.empty_like(x_Th) if num_hb == 1 else torch.zeros(x_Th.shape, dtype=torch.float32, device=dev)
        dg_P = torch.empty_like(gates_P) if need_g else None
        per_pair = ctx.deterministic and (need_u or need_v)
        ds_P = torch.empty(P, dtype=torch.float32, device=dev) if per_pair else None
        w_P = torch.empty(P, dtype=torch.float32, device=dev) if per_pair else None

        # Unused pointer slots get a valid tensor; their stores are compiled out by the flags.
        dummy = gates_P
        if T > 0:
            du_arg = du_work if need_u else dummy
            dv_arg = dv_work if need_v else dummy
            dx_arg = dx_Th if need_x else dummy
            _peer_bwd_token_kernel[(T,)](
                x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, dy_Th,
                dx_arg, dg_P if need_g else dummy, du_arg, dv_arg,
                ds_P if per_pair else dummy, w_P if per_pair else dummy,
                h, x_Th.stride(0), u_Nh.stride(0), v_Nh.stride(0), dy_Th.stride(0),
                dx_Th.stride(0) if need_x else 0,
                du_work.stride(0) if need_u else 0, dv_work.stride(0) if need_v else 0,
                ACT=ctx.act, BLOCK_P=block_p, BLOCK_H=block_h, NUM_HB=num_hb,
                NEED_DX=bool(need_x), NEED_DG=bool(need_g), NEED_DU=bool(need_u), NEED_DV=bool(need_v),
                ATOMIC_TABLES=bool(atomic), STORE_PAIR=bool(per_pair), num_warps=num_warps,
            )
        elif need_g:
            dg_P.zero_()  # no tokens means no pairs; keeps the shape contract

        if per_pair and P > 0:
            # Stable sort: inside a run of equal ids, pairs keep their original (token) order, so the
            # summation order depends on the inputs only.
            sorted_ids, perm_P = torch.sort(ids_P, stable=True)
            seg_ids_S, counts_S = torch.unique_consecutive(sorted_ids, return_counts=True)
            seg_offsets = torch.zeros(seg_ids_S.numel() + 1, dtype=torch.int64, device=dev)
            torch.cumsum(counts_S, 0, out=seg_offsets[1:])
            tok_P = pair_tokens(offsets_T1, P)
            tb_h = min(block_h, 256)  # more programs per row: segments are short, rows may be wide
            tb_p = max(1, min(32, _TILE_ELEMS // tb_h))
            grid = (seg_ids_S.numel(), triton.cdiv(h, tb_h))
            _peer_bwd_table_kernel[grid](
                x_Th, dy_Th, perm_P, tok_P, ds_P, w_P, seg_ids_S, seg_offsets,
                du_work if need_u else dummy, dv_work if need_v else dummy,
                h, x_Th.stride(0), dy_Th.stride(0),
                du_work.stride(0) if need_u else 0, dv_work.stride(0) if need_v else 0,
                BLOCK_P=tb_p, BLOCK_H=tb_h, NEED_DU=bool(need_u), NEED_DV=bool(need_v), num_warps=4,
            )

        if need_x and dx_Th.dtype != x_Th.dtype:
            dx_Th = dx_Th.to(x_Th.dtype)
        du = _table_finish(u_Nh, du_target, du_fused, du_work) if need_u else None
        dv = _table_finish(v_Nh, dv_target, dv_fused, dv_work) if need_v else None
        return dx_Th, du, dv, None, dg_P, None, None, None


def peer_experts_triton(
    x_Th: Tensor,
    u_Nh: Tensor,
    v_Nh: Tensor,
    ids_P: Tensor,
    gates_P: Tensor,
    offsets_T1: Tensor,
    activation: str = "gelu",
    *,
    deterministic: bool = False,
) -> Tensor:
    """Fused PEER experts (module docstring); out [T, h] in x's dtype, differentiable in x, u, v, gates.

    ``deterministic=True`` replaces the atomic table-gradient adds by a sorted segment reduction,
    giving bitwise-identical gradients run to run (slower: a sort and a second pass).
    """
    if not available():
        raise RuntimeError("the Triton PEER backend needs Triton and a CUDA device (or TRITON_INTERPRET=1); "
                           "fix: pass backend='chunked'")
    check_inputs(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation)
    if activation not in _ACT_CODES:  # pragma: no cover - ACTIVATIONS and _ACT_CODES list the same names
        raise ValueError(f"activation {activation!r} has no Triton kernel; choose from {', '.join(ACTIVATIONS)}")
    if x_Th.dtype not in _SUPPORTED_DTYPES or u_Nh.dtype != x_Th.dtype or v_Nh.dtype != x_Th.dtype:
        raise ValueError(f"x {x_Th.dtype}, u {u_Nh.dtype}, v {v_Nh.dtype}: the Triton backend computes in fp32 "
                         "and needs one dtype among float32, bfloat16, float16; fix: cast, or use backend='chunked'")
    if x_Th.device.type != "cuda" and not _interpreting():
        raise ValueError(f"tensors on {x_Th.device}: the Triton backend needs CUDA tensors (CPU only under "
                         "TRITON_INTERPRET=1); fix: move them to the GPU or pass backend='chunked'")
    ids_P = ids_P.to(torch.int64).contiguous()
    offsets_T1 = offsets_T1.to(torch.int64).contiguous()
    gates_P = gates_P.contiguous()
    return _TritonPeer.apply(_rows(x_Th), _rows(u_Nh), _rows(v_Nh), ids_P, gates_P, offsets_T1, activation, deterministic)
