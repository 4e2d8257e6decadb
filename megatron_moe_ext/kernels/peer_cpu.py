"""Fused PEER expert kernel for CPUs (``csrc/peer_cpu.cpp``), built on first use with the system
C++ compiler and loaded with ctypes.

Why a compiled kernel: the torch paths gather each pair's u and v rows into [chunk, h] copies
and write [chunk, h] outer products before scattering them into the gradients; the memory
traffic of those copies, not arithmetic, bounds PEER on a CPU. The fused kernel reads each row
where it lies and accumulates straight into the output, the input gradient and the table
gradients (Megatron's ``main_grad`` when present), in fp32.

Build: ``g++ -O3 -march=native -shared`` (~2 s, no torch headers) into
``$MEGATRON_MOE_EXT_CACHE/kernels`` (default ``~/.cache/megatron_moe_ext/kernels``), keyed by
the source's hash, compiled to a temporary name and renamed. ``available()`` is False without a
compiler (``auto`` then picks the chunked torch path); ``MEGATRON_MOE_EXT_NO_CPU_KERNEL=1``
turns it off.

Legend: T tokens, h hidden, N table rows, P pairs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from megatron_moe_ext.kernels.peer_common import _table_grad_result, _table_grad_target
from megatron_moe_ext.kernels.peer_reference import pair_tokens
from megatron_moe_ext.kernels.huge_pages import collapse_huge

Tensor = torch.Tensor
_SOURCE = Path(__file__).with_name("csrc") / "peer_cpu.cpp"
_ACT_CODES = {"gelu": 0, "relu": 1, "silu": 2}
_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("MEGATRON_MOE_EXT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megatron_moe_ext")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _build() -> ctypes.CDLL:
    source = _SOURCE.read_bytes()
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++/c++ or $CXX) on PATH")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread"]
    digest = hashlib.sha256(source + " ".join([cxx, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"peer_cpu_{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([cxx, *flags, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, target)  # atomic: concurrent ranks never load a half-written library
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"building {_SOURCE.name} failed: {err.stderr[-2000:]}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.peer_forward.argtypes = [p, p, p, p, p, p, i64, i64, i32, p, p, i32]
    lib.peer_backward_tokens.argtypes = [p, p, p, p, p, p, p, i64, i64, i32, p, p, p, p, i32]
    lib.peer_backward_tables.argtypes = [p, p, p, p, p, p, p, i64, p, p, i32]
    lib.row_topk.argtypes = [p, i64, i64, i64, p, p, i32]
    for fn in (lib.peer_forward, lib.peer_backward_tokens, lib.peer_backward_tables, lib.row_topk):
        fn.restype = None
    return lib


def _lib() -> ctypes.CDLL:
    global _LIB, _ERROR
    with _LOCK:
        if _LIB is None and _ERROR is None:
            try:
                _LIB = _build()
            except (RuntimeError, OSError) as err:
                _ERROR = str(err)
        if _LIB is None:
            raise RuntimeError(f"the fused CPU PEER kernel is unavailable: {_ERROR}")
        return _LIB


def available() -> bool:
    """True when the kernel builds (or is cached) and is not switched off."""
    if os.environ.get("MEGATRON_MOE_EXT_NO_CPU_KERNEL") == "1":
        return False
    try:
        _lib()
    except RuntimeError:
        return False
    return True


def row_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``torch.topk(scores, k, dim=-1, sorted=True)`` for fp32 CPU tensors, by the compiled kernel
    when it is available (the product-key sub-key search: k' ~ 16 of n ~ 1024 per row)."""
    if scores.dtype != torch.float32 or scores.device.type != "cpu" or k > scores.shape[-1] or not available():
        return torch.topk(scores, k, dim=-1, sorted=True)
    rows_Rn = scores.reshape(-1, scores.shape[-1]).contiguous()
    vals = torch.empty(rows_Rn.shape[0], k, dtype=scores.dtype)
    idx = torch.empty(rows_Rn.shape[0], k, dtype=torch.int64)
    _lib().row_topk(_ptr(rows_Rn), rows_Rn.shape[0], rows_Rn.shape[1], k, _ptr(vals), _ptr(idx), torch.get_num_threads())
    return vals.view(*scores.shape[:-1], k), idx.view(*scores.shape[:-1], k)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _FusedPeer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, activation):  # type: ignore[override]
        lib, threads = _lib(), torch.get_num_threads()
        x_Th, ids_P, gates_P, offsets_T1 = x_Th.contiguous(), ids_P.contiguous(), gates_P.contiguous(), offsets_T1.contiguous()
        T, h = x_Th.shape
        out_Th = torch.zeros_like(x_Th)
        s_P = torch.empty_like(gates_P)
        lib.peer_forward(_ptr(x_Th), _ptr(u_Nh), _ptr(v_Nh), _ptr(ids_P), _ptr(gates_P), _ptr(offsets_T1), T, h,
                         _ACT_CODES[activation], _ptr(s_P), _ptr(out_Th), threads)
        ctx.save_for_backward(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, s_P)
        ctx.activation = activation
        return out_Th

    @staticmethod
    def backward(ctx, grad_Th):  # type: ignore[override]
        x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, s_P = ctx.saved_tensors
        lib, threads = _lib(), torch.get_num_threads()
        need_x, need_u, need_v, _, need_g = ctx.needs_input_grad[:5]
        dy_Th = grad_Th.contiguous().float()
        T, h = x_Th.shape
        P = ids_P.numel()
        dx_Th = torch.zeros_like(x_Th) if need_x else None
        dg_P = torch.empty_like(gates_P) if need_g else None
        cu_P, cv_P = torch.empty_like(gates_P), torch.empty_like(gates_P)
        lib.peer_backward_tokens(_ptr(u_Nh), _ptr(v_Nh), _ptr(ids_P), _ptr(gates_P), _ptr(offsets_T1), _ptr(s_P),
                                 _ptr(dy_Th), T, h, _ACT_CODES[ctx.activation], _ptr(dx_Th), _ptr(dg_P),
                                 _ptr(cu_P), _ptr(cv_P), threads)
        du_buf, du_fused = _fp32_target(u_Nh) if need_u else (None, False)
        dv_buf, dv_fused = _fp32_target(v_Nh) if need_v else (None, False)
        if need_u or need_v:
            # Pairs in expert order: ascending row addresses, and per-thread ranges that own rows.
            ids_sorted, order = torch.sort(ids_P, stable=True)
            tok_P = pair_tokens(offsets_T1, P).index_select(0, order)
            bounds = _thread_bounds(ids_sorted, threads)
            # Named, not inline: a temporary's memory would be freed before the call reads it.
            cu_sorted, cv_sorted = cu_P.index_select(0, order), cv_P.index_select(0, order)
            lib.peer_backward_tables(_ptr(x_Th), _ptr(dy_Th), _ptr(ids_sorted), _ptr(tok_P), _ptr(cu_sorted),
                                     _ptr(cv_sorted), _ptr(bounds), h, _ptr(du_buf), _ptr(dv_buf), len(bounds) - 1)
        du = _table_grad_result(u_Nh, du_buf, du_fused) if need_u else None
        dv = _table_grad_result(v_Nh, dv_buf, dv_fused) if need_v else None
        return dx_Th, du, dv, None, dg_P, None, None


def _thread_bounds(ids_sorted: Tensor, threads: int) -> Tensor:
    """threads+1 pair offsets splitting sorted ids into near-equal ranges, each cut moved forward
    to a change of id so that no expert row is shared by two threads."""
    P = ids_sorted.numel()
    cuts = [0]
    for k in range(1, threads):
        c = max(k * P // threads, cuts[-1])
        if 0 < c < P:
            # First pair whose id differs from the one before the cut.
            c = int(torch.searchsorted(ids_sorted, ids_sorted[c - 1], right=True))
        cuts.append(min(c, P))
    cuts.append(P)
    return torch.tensor(cuts, dtype=torch.int64)


def _fp32_target(table: Tensor) -> tuple[Tensor, bool]:
    """The kernel writes fp32 rows: Megatron's fp32 main_grad directly, else a new fp32 buffer."""
    buf, fused = _table_grad_target(table)
    if fused:
        collapse_huge(buf)  # Megatron's grad buffer, written at random rows every step
    if buf.dtype != torch.float32 or not buf.is_contiguous():
        raise ValueError(f"the fused CPU PEER kernel accumulates fp32 gradients, got a {buf.dtype} buffer; "
                         "fix: keep fp32 main_grad (Megatron's default) or use --moe-peer-backend chunked")
    return buf, fused


def peer_experts_cpu(x_Th: Tensor, u_Nh: Tensor, v_Nh: Tensor, ids_P: Tensor, gates_P: Tensor, offsets_T1: Tensor, activation: str = "gelu") -> Tensor:
    """Fused CPU kernel (fp32 CPU tensors; tables contiguous)."""
    tensors = {"x": x_Th, "u": u_Nh, "v": v_Nh, "gates": gates_P}
    bad = {k: (t.dtype, t.device.type) for k, t in tensors.items() if t.dtype != torch.float32 or t.device.type != "cpu"}
    if bad:
        raise ValueError(f"the fused CPU PEER kernel takes fp32 CPU tensors, got {bad}; fix: --moe-peer-backend chunked "
                         "(any dtype) or fp32 parameters")
    if not (u_Nh.is_contiguous() and v_Nh.is_contiguous()):
        raise ValueError("the fused CPU PEER kernel needs contiguous tables u and v; fix: pass .contiguous() tables")
    return _FusedPeer.apply(x_Th, u_Nh, v_Nh, ids_P.to(torch.int64), gates_P, offsets_T1.to(torch.int64), activation)
