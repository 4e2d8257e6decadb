"""PEER layer (He 2024) on CPU: time against dense SwiGLU FFNs, and the chunked backend's memory.

Two measurements per number of experts N (= n*n), fp32, forward + backward:

* **time**: the real ``PEERLayer`` (product-key retrieval with batchnorm query norm, backend
  'chunked'; every parameter given an fp32 ``main_grad`` buffer and a post-accumulate-grad hook
  doing what Megatron DDP's backward hook does, ``grad_added_to_main_grad`` reset to False before
  every call as ``zero_grad_buffer`` does, so the chunked backward adds the table gradients
  straight into ``main_grad``) against two dense baselines, each **Megatron's own ``MLP``**
  (local ColumnParallelLinear/RowParallelLinear, ``gated_linear_unit`` + silu = SwiGLU, no bias,
  same DDP-like grad handling) on the same [S, B, hidden] input (S = tokens, B = 1):

  - FLOP-matched: SwiGLU hidden f with 6*h*f forward FLOPs per token equal to PEER's forward
    FLOPs per token including retrieval: query projection 2*h*H*D + sub-key scores 2*H*n*D (both
    halves, n = sqrt(N) keys of D/2 each) + experts 4*G*h (G = heads*topk; a dot product and an
    axpy of h per expert). Top-k selection, norms and softmax are not counted (definition);
    f = round(FLOPs / (6h)), the actual dense/PEER FLOP ratio is printed;
  - active-parameter-matched: 3*h*f = 2*G*h, i.e. f = round(2G/3) (experts' parameters only).

  Timed interleaved in one process (``common.py``), median of the repeats; PEER/dense time ratios
  are the result (per-repeat paired ratios and process-CPU-time ratios as noise checks), absolute
  times are context. Goal quoted: PEER/dense (FLOP-matched) time <= 4 at N = 1M. Before timing
  (N <= CHECK_MAX_N) the layer's chunked output and gradients (input, both tables' main_grad,
  retrieval weights) are checked against the same layer with backend 'eager' on a prefix of the
  tokens: the timed path must compute the reference math.

* **memory**: peak extra memory of forward + backward of the expert compute alone,
  ``peer_experts`` with fixed ids and gates from a random product-key retrieval (random queries
  and sub-keys; T tokens, K = heads*topk pairs per token), backend 'chunked' (tables carry
  ``main_grad``, as under DDP) vs backend 'eager' (the naive gather reference), same inputs.
  Measured exactly with a ``TorchDispatchMode`` (``StoragePeakTracker``): every untyped storage
  that an op creates inside the region is counted once by its nbytes and released through
  ``weakref.finalize`` when it dies; the peak of the live sum is reported. **Excluded**: the
  tables' gradients, two [N, hidden] tensors, identified by identity (a tensor hook on each table
  sees the gradient autograd hands it, and the final ``.grad``), not by shape, since a chunk of
  C pairs gathers [C, h] tensors and C = N is possible (eager: a dense [N, h] per table from the
  index backward; chunked: an untouched ``torch.empty`` placeholder, the rows going into
  ``main_grad`` preallocated outside the region; the run stops if anything else is excluded). Both paths produce one per table (or write
  into main_grad), they scale with N rather than with the pairs, and they are what Megatron's
  grad buffer holds anyway. Everything else allocated inside counts (gathers, products, output,
  input and gate gradients, autograd buffers). Storages that existed before the region (inputs,
  tables, main_grad) are not counted, nor are resizes of such storages. Goal: chunked/eager peak
  extra bytes <= 0.35. Absolute MiB are printed next to the ratio (memory is deterministic: one
  measurement per backend).

Usage: ``python benchmarks/bench_peer.py [--sizes 16384 262144 1048576] [--what time|memory|both]
[--json PATH] [--markdown PATH]``; ``--smoke`` picks tiny sizes (the unit test runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
import warnings
import weakref
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")

from benchmarks.common import (  # noqa: E402
    interleaved_medians,
    machine_description,
    markdown_table,
    paired_ratios,
    text_table,
)

FULL = dict(sizes=[16384, 262144, 1048576], tokens=2048, hidden=512, heads=8, topk=16, key_dim=128,
            chunk_pairs=16384, repeats=5, warmup=1)
MEMORY_BACKENDS = ("cpu_fused", "chunked", "eager")
SMOKE = dict(sizes=[64, 256], tokens=64, hidden=32, heads=2, topk=4, key_dim=16, chunk_pairs=64, repeats=1, warmup=0)
MIN_REPEATS = 5
GOAL_TIME_RATIO = 4.0  # PEER / FLOP-matched dense time at N = 1M
GOAL_TIME_N = 1048576
GOAL_MEMORY_RATIO = 0.35  # chunked / eager peak extra bytes
CHECK_MAX_N = 262144  # chunked-vs-eager layer check up to this N (the eager table grads are dense [N, h])
CHECK_TOKENS = 256
OUT_ATOL = 1e-4
GRAD_RTOL = 1e-4
SECTION_TITLE = "PEER layer vs dense SwiGLU FFN, and chunked vs eager expert memory (CPU)"
MIB = 2.0**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", help=f"numbers of experts N, perfect squares (default {FULL['sizes']})")
    parser.add_argument("--tokens", type=int, help=f"tokens per batch (S, with B = 1) (default {FULL['tokens']})")
    parser.add_argument("--hidden", type=int, help=f"hidden size h (default {FULL['hidden']})")
    parser.add_argument("--heads", type=int, help=f"retrieval heads H (default {FULL['heads']})")
    parser.add_argument("--topk", type=int, help=f"experts per head and token k (default {FULL['topk']})")
    parser.add_argument("--key-dim", type=int, help=f"query dimension per head D (default {FULL['key_dim']})")
    parser.add_argument("--backend", default="cpu_fused", choices=("cpu_fused", "chunked", "embedding_bag"),
                        help="PEER expert backend of the timed layer (default cpu_fused, what 'auto' picks for fp32 on CPU)")
    parser.add_argument("--chunk-pairs", type=int, help=f"pairs per chunk of the chunked backend (default {FULL['chunk_pairs']}, "
                        "the layer's default)")
    parser.add_argument("--repeats", type=int, help=f"timed interleaved repeats, protocol >= {MIN_REPEATS} (default {FULL['repeats']})")
    parser.add_argument("--warmup", type=int, help=f"untimed interleaved rounds before timing (default {FULL['warmup']})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--what", choices=("time", "memory", "both"), default="both")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement (and samples) to this JSON file")
    parser.add_argument("--markdown", type=Path, default=None, help="append a results section to this markdown file")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes for a quick check (defaults {SMOKE})")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} must be >= 1")
    args.below_protocol = args.repeats < MIN_REPEATS and not args.smoke
    from megatron_moe_ext.settings.peer import peer_layout

    for n in args.sizes:
        try:
            peer_layout(n, heads=args.heads, topk=args.topk, key_dim=args.key_dim)
        except ValueError as exc:
            parser.error(str(exc))
    args.sizes = sorted(set(args.sizes))
    return args


# ---------------------------------------------------------------------------------------------
# Memory tracker


class StoragePeakTracker(TorchDispatchMode):
    """Live bytes of the tensor storages created inside this mode, and their peak.

    After every op, each output tensor whose untyped storage is neither already tracked nor the
    storage of one of the op's inputs (views, in-place and out= ops return those) is a new
    allocation: counted once by ``nbytes()``, released by ``weakref.finalize`` on the storage
    (torch preserves a storage's Python object while the storage lives). Every allocation gets a
    serial number and the allocations and releases are logged in order, so storages can be
    excluded afterwards by identity (``exclude(tensor)`` while the tensor lives): ``peak`` is the
    peak of the live sum without them, ``raw_peak`` with them. Storages that existed before
    entering, and resizes of storages, are not tracked.
    """

    def __init__(self) -> None:
        super().__init__()
        self._serial_of: dict[int, int] = {}  # live storage (_cdata) -> serial
        self._nbytes: list[int] = []  # by serial
        self._shape: list[tuple[int, ...]] = []  # shape of the first tensor seen on the storage
        self._events: list[int] = []  # +serial+1 allocated, -(serial+1) released
        self._excluded: set[int] = set()
        self.live = 0
        self.raw_peak = 0

    def _release(self, key: int) -> None:
        serial = self._serial_of.pop(key, None)
        if serial is not None:
            self.live -= self._nbytes[serial]
            self._events.append(-(serial + 1))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._serial_of or key in inputs:
                continue
            serial = len(self._nbytes)
            self._serial_of[key] = serial
            self._nbytes.append(storage.nbytes())
            self._shape.append(tuple(t.shape))
            self._events.append(serial + 1)
            self.live += self._nbytes[serial]
            self.raw_peak = max(self.raw_peak, self.live)
            weakref.finalize(storage, self._release, key)
        return out

    def exclude(self, tensor: torch.Tensor) -> bool:
        """Leave the storage of ``tensor`` (a live tensor) out of ``peak``; False if not tracked."""
        serial = self._serial_of.get(tensor.untyped_storage()._cdata)
        if serial is None:
            return False
        self._excluded.add(serial)
        return True

    @property
    def excluded(self) -> list[tuple[tuple[int, ...], int]]:
        """(shape, nbytes) of the excluded storages."""
        return [(self._shape[s], self._nbytes[s]) for s in sorted(self._excluded)]

    @property
    def excluded_bytes(self) -> int:
        return sum(self._nbytes[s] for s in self._excluded)

    @property
    def allocations(self) -> int:
        return len(self._nbytes) - len(self._excluded)

    @property
    def peak(self) -> int:
        """Peak live bytes of the tracked storages, excluded ones left out."""
        live = peak = 0
        for event in self._events:
            serial = abs(event) - 1
            if serial in self._excluded:
                continue
            live += self._nbytes[serial] if event > 0 else -self._nbytes[serial]
            peak = max(peak, live)
        return peak


def tracker_self_check() -> str:
    """The tracker against known allocations: a 1 MiB tensor (peak exactly 1 MiB), a view and an
    in-place op on it (no new storage), freed (live back to 0), then 0.5 MiB (peak stays 1 MiB)
    and a 2 MiB tensor excluded by identity (peak still 1 MiB, raw peak 2.5 MiB). SystemExit on
    any mismatch; returns a one-line summary."""
    with StoragePeakTracker() as tr:
        a = torch.empty(2**18)  # 2^18 fp32 = 1 MiB
        a.fill_(1.0)
        view = a.view(2, -1)
        view.mul_(2.0)
        del a, view
        live_after_free = tr.live
        b = torch.zeros(2**17)  # 0.5 MiB
        c = torch.zeros(2**19)  # 2 MiB, excluded below
        excluded = tr.exclude(c)
        del b, c
    ok = (tr.peak == MIB and tr.raw_peak == 2.5 * MIB and live_after_free == 0 and tr.live == 0 and excluded
          and tr.excluded_bytes == 2 * MIB and tr.allocations == 2)
    summary = (f"peak {tr.peak / MIB:.3f} MiB for a 1 MiB tensor, live after free {live_after_free} B, "
               f"excluded {tr.excluded_bytes / MIB:.1f} MiB by identity, allocations {tr.allocations}")
    if not ok:
        raise SystemExit(f"tracker self-check failed: {summary} (raw peak {tr.raw_peak} B, live at end {tr.live} B)")
    return summary


# ---------------------------------------------------------------------------------------------
# Setup and models


def _pg_collection():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def peer_flops_per_token(args: argparse.Namespace, num_experts: int) -> dict[str, int]:
    """Forward FLOPs per token of the PEER layer (see the module docstring)."""
    h, H, D, G = args.hidden, args.heads, args.key_dim, args.heads * args.topk
    n = math.isqrt(num_experts)
    parts = {"query": 2 * h * H * D, "subkeys": 2 * H * n * D, "experts": 4 * G * h}
    parts["total"] = sum(parts.values())
    return parts


def dense_sizes(args: argparse.Namespace, num_experts: int) -> dict[str, int]:
    """SwiGLU hidden sizes of the two baselines."""
    flops = peer_flops_per_token(args, num_experts)["total"]
    G = args.heads * args.topk
    return {"dense_flops": max(1, round(flops / (6 * args.hidden))), "dense_params": max(1, round(2 * G / 3))}


def peer_config(args: argparse.Namespace, num_experts: int):
    from megatron_moe_ext.testing.tiny import tiny_config

    return tiny_config(
        num_layers=1, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden, num_moe_experts=None,
        moe_peer_num_experts=num_experts, moe_peer_layers="all", moe_peer_heads=args.heads, moe_peer_topk=args.topk,
        moe_peer_key_dim=args.key_dim, moe_peer_query_norm="batchnorm", moe_peer_backend=args.backend,
        moe_peer_chunk_pairs=args.chunk_pairs, init_method_std=0.02,
    )


def dense_mlp(args: argparse.Namespace, ffn: int):
    """Megatron's MLP (local linears) as SwiGLU: gated_linear_unit + silu, no bias."""
    from megatron_moe_ext.layers.peer import local_mlp_builder
    from megatron_moe_ext.testing.tiny import tiny_config

    cfg = tiny_config(num_layers=1, hidden_size=args.hidden, ffn_hidden_size=ffn, num_moe_experts=None,
                      gated_linear_unit=True, activation_func=torch.nn.functional.silu, init_method_std=0.02)
    return local_mlp_builder()(config=cfg, pg_collection=_pg_collection(), is_mtp_layer=False, ffn_hidden_size=ffn)


def attach_main_grads(module: torch.nn.Module) -> list:
    """fp32 ``main_grad`` per parameter and a post-accumulate-grad hook doing what Megatron DDP's
    backward hook does (add ``grad`` into ``main_grad`` unless ``grad_added_to_main_grad``, then
    drop ``grad``). Returns the hook handles."""
    handles = []
    for param in module.parameters():
        param.main_grad = torch.zeros(param.shape, dtype=torch.float32)
        param.grad_added_to_main_grad = False

        def hook(p: torch.Tensor) -> None:
            if p.grad is not None and not p.grad_added_to_main_grad:
                p.main_grad.add_(p.grad)
            p.grad = None

        handles.append(param.register_post_accumulate_grad_hook(hook))
    return handles


def reset_grads(module: torch.nn.Module, zero_main_grad: bool = False) -> None:
    """What ``zero_grad_buffer`` does per step (zeroing main_grad only when asked: timing skips it)."""
    for param in module.parameters():
        param.grad = None
        param.grad_added_to_main_grad = False
        if zero_main_grad:
            param.main_grad.zero_()


def _free() -> None:
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_close(what: str, ours: torch.Tensor, ref: torch.Tensor, *, atol: float | None = None) -> float:
    ours, ref = ours.detach().float(), ref.detach().float()
    if ours.shape != ref.shape:
        raise SystemExit(f"check failed: {what}: shapes differ, chunked {tuple(ours.shape)} vs eager {tuple(ref.shape)}")
    diff = (ours - ref).abs().max().item() if ref.numel() else 0.0
    tol = atol if atol is not None else GRAD_RTOL * max(1.0, ref.abs().max().item())
    if not diff <= tol:
        raise SystemExit(f"check failed: {what}: max |chunked - eager| = {diff:.3g} > {tol:.3g}; refusing to time")
    return diff


def check_layer(layer, x_SBh: torch.Tensor, grad_SBh: torch.Tensor, num_experts: int) -> float:
    """The layer with backend 'chunked' against itself with backend 'eager' on the first
    CHECK_TOKENS tokens: output, input gradient, every parameter's main_grad."""
    tokens = min(CHECK_TOKENS, x_SBh.shape[0])
    x = x_SBh[:tokens].detach().clone().requires_grad_()
    g = grad_SBh[:tokens]
    results = {}
    timed = layer.backend
    for backend in ("eager", timed):
        layer.backend = backend
        reset_grads(layer, zero_main_grad=True)
        x.grad = None
        out, _ = layer(x)
        out.backward(g)
        results[backend] = (out.detach(), x.grad.clone(), {n: p.main_grad.clone() for n, p in layer.named_parameters()})
    layer.backend = timed
    diff = check_close(f"N={num_experts} layer output", results[timed][0], results["eager"][0], atol=OUT_ATOL)
    check_close(f"N={num_experts} layer input grad", results[timed][1], results["eager"][1])
    for name, ref in results["eager"][2].items():
        check_close(f"N={num_experts} layer {name} grad", results[timed][2][name], ref)
    reset_grads(layer, zero_main_grad=True)
    return diff


# ---------------------------------------------------------------------------------------------
# Benchmarks


def bench_time(args: argparse.Namespace, num_experts: int) -> dict:
    from megatron_moe_ext.layers.peer import PEERLayer

    torch.manual_seed(3000 + num_experts)
    layer = PEERLayer(peer_config(args, num_experts), pg_collection=_pg_collection())
    assert layer.backend == args.backend and layer.query_norm is not None
    ffn = dense_sizes(args, num_experts)
    modules = {"peer": layer, **{name: dense_mlp(args, f) for name, f in ffn.items()}}
    handles = []
    for module in modules.values():
        module.train()
        handles += attach_main_grads(module)

    gen = torch.Generator().manual_seed(4000 + num_experts)
    x_SBh = torch.randn(args.tokens, 1, args.hidden, generator=gen).requires_grad_()
    grad_SBh = torch.randn(args.tokens, 1, args.hidden, generator=gen)
    max_diff = check_layer(layer, x_SBh, grad_SBh, num_experts) if num_experts <= CHECK_MAX_N else None

    def clear(name: str) -> None:
        x_SBh.grad = None
        reset_grads(modules[name])

    def step(name: str):
        module = modules[name]

        def run() -> None:
            out, _ = module(x_SBh)
            out.backward(grad_SBh)
        return run

    fns = {name: step(name) for name in ("peer", "dense_flops", "dense_params")}
    samples: dict[str, list[float]] = {}
    cpu_samples: dict[str, list[float]] = {}
    medians = interleaved_medians(fns, args.repeats, args.warmup, setup=clear, samples=samples, cpu_samples=cpu_samples)
    # Sanity: the chunked backward wrote the tables' gradients into main_grad (fused path).
    fused = bool(layer.u.grad_added_to_main_grad and layer.v.grad_added_to_main_grad)
    for handle in handles:
        handle.remove()
    flops = peer_flops_per_token(args, num_experts)
    row = dict(N=num_experts, n=math.isqrt(num_experts), ffn=ffn, peer_flops_per_token=flops,
               dense_flops_per_token={k: 6 * args.hidden * f for k, f in ffn.items()},
               medians=medians, samples=samples, cpu_samples=cpu_samples, max_diff=max_diff, fused_main_grad=fused)
    return row  # the modules (and the tables) die with this frame; main() then trims the heap


def random_retrieval(args: argparse.Namespace, num_experts: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T*K] and softmax gates [T*K] of a product-key retrieval with random queries and sub-keys
    (the layer's layout: heads in order, each head's k by score)."""
    from megatron_moe_ext.kernels.product_keys import (
        product_key_half_scores,
        topk_from_half_scores,
    )

    H, D, n, k, T = args.heads, args.key_dim, math.isqrt(num_experts), args.topk, args.tokens
    q = torch.randn(T, H, D, generator=gen)
    keys = tuple(torch.randn(H, n, D // 2, generator=gen) * (D // 2) ** -0.5 for _ in range(2))
    with torch.no_grad():
        a, b = product_key_half_scores(q, keys)
        scores, ids = topk_from_half_scores(a, b, k)
        gates = torch.softmax(scores, dim=-1)
    return ids.reshape(-1).contiguous(), gates.reshape(-1).contiguous()


def bench_memory(args: argparse.Namespace, num_experts: int) -> dict:
    """Peak extra bytes of peer_experts forward + backward, chunked (tables with main_grad) vs eager."""
    from megatron_moe_ext.kernels.peer_experts import peer_experts, uniform_offsets

    gen = torch.Generator().manual_seed(5000 + num_experts)
    T, h, K = args.tokens, args.hidden, args.heads * args.topk
    ids_P, gates = random_retrieval(args, num_experts, gen)
    offsets_T1 = uniform_offsets(T, K, "cpu")
    x = torch.randn(T, h, generator=gen).requires_grad_()
    gates_P = gates.requires_grad_()
    u = torch.nn.Parameter(0.02 * torch.randn(num_experts, h, generator=gen))
    v = torch.nn.Parameter(0.02 * torch.randn(num_experts, h, generator=gen))
    grad_Th = torch.randn(T, h, generator=gen)
    result = {}
    # chunked first, with main_grad (preallocated outside the region, as Megatron's grad buffer);
    # then main_grad is dropped before eager so both [N, h] gradient sets never coexist.
    for backend in MEMORY_BACKENDS:
        if backend != "eager":
            for table in (u, v):
                table.main_grad = torch.zeros(num_experts, h)
                table.grad_added_to_main_grad = False
        x.grad = gates_P.grad = u.grad = v.grad = None
        _free()
        tracker = StoragePeakTracker()
        # The tables' gradients, excluded by identity: the tensor autograd hands each table (hook,
        # before accumulation) and what ends up in .grad.
        def exclude_grad(grad: torch.Tensor, tracker: StoragePeakTracker = tracker) -> None:
            tracker.exclude(grad)

        hooks = [table.register_hook(exclude_grad) for table in (u, v)]
        with tracker:
            out = peer_experts(x, u, v, ids_P, gates_P, offsets_T1, "gelu", backend=backend, chunk_pairs=args.chunk_pairs)
            out.backward(grad_Th)
            del out
        for hook in hooks:
            hook.remove()
        for table in (u, v):
            if table.grad is not None:
                tracker.exclude(table.grad)
        bad = [shape for shape, _ in tracker.excluded if shape != (num_experts, h)]
        if bad or len(tracker.excluded) != 2:
            raise SystemExit(f"check failed: {backend}: excluded storages {tracker.excluded}, expected two [N, h] table grads")
        if backend != "eager":
            fused = bool(u.grad_added_to_main_grad and v.grad_added_to_main_grad)
            if not fused:
                raise SystemExit(f"check failed: the {backend} backward did not write into main_grad")
            for table in (u, v):
                del table.main_grad, table.grad_added_to_main_grad
        result[backend] = dict(peak=tracker.peak, raw_peak=tracker.raw_peak, excluded=tracker.excluded_bytes,
                               allocations=tracker.allocations, live_at_end=tracker.live)
        x.grad = gates_P.grad = u.grad = v.grad = None
    P = ids_P.numel()
    row = dict(N=num_experts, pairs=P, chunk_pairs=min(args.chunk_pairs, P), result=result,
               ratio=result["chunked"]["peak"] / result["eager"]["peak"],
               fused_ratio=result["cpu_fused"]["peak"] / result["eager"]["peak"],
               eager_in_Ph=result["eager"]["peak"] / (P * h * 4),
               chunked_in_Ch=result["chunked"]["peak"] / (min(args.chunk_pairs, P) * h * 4))
    return row


# ---------------------------------------------------------------------------------------------
# Reporting


def time_ratios(row: dict, dense: str) -> dict[str, float]:
    med, cpu = row["medians"], row["cpu_samples"]
    per_round = sorted(paired_ratios(row["samples"], "peer", dense))
    return dict(ratio=med["peer"] / med[dense], paired_median=statistics.median(per_round), paired_min=per_round[0],
                paired_max=per_round[-1], cpu_ratio=statistics.median(cpu["peer"]) / statistics.median(cpu[dense]))


def describe_time(row: dict) -> str:
    med, f = row["medians"], row["ffn"]
    flop_match = row["dense_flops_per_token"]["dense_flops"] / row["peer_flops_per_token"]["total"]
    parts = []
    for dense, label in (("dense_flops", "FLOP-matched"), ("dense_params", "param-matched")):
        r = time_ratios(row, dense)
        parts.append(f"PEER/dense {label} (f={f[dense]}) time {r['ratio']:.3f} [per-repeat median {r['paired_median']:.3f}, "
                     f"min {r['paired_min']:.3f}, max {r['paired_max']:.3f}; CPU-time ratio {r['cpu_ratio']:.3f}]")
    check = f"not checked (N > {CHECK_MAX_N})" if row["max_diff"] is None else f"max |out chunked - eager| {row['max_diff']:.1e}"
    return (f"N={row['N']:>8} time  : " + " | ".join(parts)
            + f" (median ms: PEER {1e3 * med['peer']:.1f}, dense FLOP-matched {1e3 * med['dense_flops']:.1f}, "
            f"dense param-matched {1e3 * med['dense_params']:.1f}; dense/PEER forward FLOPs {flop_match:.3f}; {check}; "
            f"tables' grads fused into main_grad: {row['fused_main_grad']})")


def describe_memory(row: dict) -> str:
    c, e, fz = row["result"]["chunked"], row["result"]["eager"], row["result"]["cpu_fused"]
    return (f"N={row['N']:>8} memory: chunked/eager peak extra bytes {row['ratio']:.3f}, cpu_fused/eager "
            f"{row['fused_ratio']:.4f} (cpu_fused {fz['peak'] / MIB:.1f} MiB, chunked {c['peak'] / MIB:.1f} MiB, "
            f"eager {e['peak'] / MIB:.1f} MiB; eager = {row['eager_in_Ph']:.2f} x [P, h] fp32 with P = {row['pairs']} pairs, "
            f"chunked = {row['chunked_in_Ch']:.2f} x [C, h] fp32 with C = {row['chunk_pairs']}; excluded [N, h] table "
            f"grads: chunked {c['excluded'] / MIB:.1f} MiB, eager {e['excluded'] / MIB:.1f} MiB)")


def table(time_rows: list[dict], memory_rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["N", "PEER fwd kFLOP/token", "f flop / f param", "PEER/dense time (FLOP-matched)",
               "per-repeat (min-max)", "CPU-time ratio", "PEER/dense time (param-matched)", "PEER ms", "dense ms (flop, param)",
               "chunked/eager peak bytes", "chunked MiB", "eager MiB"]
    by_n_t = {r["N"]: r for r in time_rows}
    by_n_m = {r["N"]: r for r in memory_rows}
    out = []
    for n in sorted(set(by_n_t) | set(by_n_m)):
        t, m = by_n_t.get(n), by_n_m.get(n)
        cells = [str(n)]
        if t is not None:
            rf, rp = time_ratios(t, "dense_flops"), time_ratios(t, "dense_params")
            med = t["medians"]
            cells += [f"{t['peer_flops_per_token']['total'] / 1e3:.0f}", f"{t['ffn']['dense_flops']} / {t['ffn']['dense_params']}",
                      f"{rf['ratio']:.2f}", f"{rf['paired_min']:.2f}-{rf['paired_max']:.2f}", f"{rf['cpu_ratio']:.2f}",
                      f"{rp['ratio']:.2f}", f"{1e3 * med['peer']:.0f}",
                      f"{1e3 * med['dense_flops']:.0f}, {1e3 * med['dense_params']:.0f}"]
        else:
            cells += ["-"] * 8
        if m is not None:
            cells += [f"{m['ratio']:.3f}", f"{m['result']['chunked']['peak'] / MIB:.1f}", f"{m['result']['eager']['peak'] / MIB:.1f}"]
        else:
            cells += ["-"] * 3
        out.append(cells)
    return headers, out


def goals(time_rows: list[dict], memory_rows: list[dict]) -> list[str]:
    lines = []
    by_n = {r["N"]: r for r in time_rows}
    if GOAL_TIME_N in by_n:
        r = time_ratios(by_n[GOAL_TIME_N], "dense_flops")["ratio"]
        lines.append(f"[time] PEER/dense FLOP-matched time <= {GOAL_TIME_RATIO:g} at N=1M: "
                     f"{'MET' if r <= GOAL_TIME_RATIO else 'NOT MET'} ({r:.2f})")
    else:
        measured = ", ".join(f"N={n}: {time_ratios(t, 'dense_flops')['ratio']:.2f}" for n, t in sorted(by_n.items()))
        lines.append(f"[time] PEER/dense FLOP-matched time <= {GOAL_TIME_RATIO:g} at N=1M: not measured (N=1M not in this run"
                     + (f"; {measured}" if measured else "") + ")")
    if memory_rows:
        ok = all(m["ratio"] <= GOAL_MEMORY_RATIO for m in memory_rows)
        detail = ", ".join(f"N={m['N']}: {m['ratio']:.3f}" for m in memory_rows)
        lines.append(f"[memory] chunked/eager peak extra bytes <= {GOAL_MEMORY_RATIO:g} at every measured N: "
                     f"{'MET' if ok else 'NOT MET'} ({detail})")
        ok = all(m["fused_ratio"] <= GOAL_MEMORY_RATIO for m in memory_rows)
        detail = ", ".join(f"N={m['N']}: {m['fused_ratio']:.4f}" for m in memory_rows)
        lines.append(f"[memory] cpu_fused/eager peak extra bytes <= {GOAL_MEMORY_RATIO:g} at every measured N: "
                     f"{'MET' if ok else 'NOT MET'} ({detail})")
    else:
        lines.append(f"[memory] chunked/eager peak extra bytes <= {GOAL_MEMORY_RATIO:g}: not measured")
    return lines


def setting_line(args: argparse.Namespace) -> str:
    return (f"setting: T={args.tokens} tokens ([S, B] = [{args.tokens}, 1]), hidden {args.hidden}, heads {args.heads}, "
            f"top-k {args.topk} (G = K = {args.heads * args.topk} experts per token), key dim {args.key_dim}, gelu experts, "
            f"softmax gates, batchnorm query norm, timed PEER backend {args.backend} (chunked: {args.chunk_pairs} pairs per chunk), fp32, forward + backward; "
            f"dense baselines = Megatron MLP (SwiGLU: gated_linear_unit + silu, no bias); median of {args.repeats} "
            f"interleaved repeats after {args.warmup} warm-up round(s)")


def markdown_section(args, machine, command, time_rows, memory_rows, goal_lines, elapsed_s) -> str:
    headers, body = table(time_rows, memory_rows)
    parts = [
        f"## {SECTION_TITLE}", "", f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} in {elapsed_s / 60:.1f} min.", "",
        "Machine:", "", *[f"- {k}: {v}" for k, v in machine.items()], "", "Command:", "", "```", command, "```", "",
        setting_line(args).replace("setting: ", "Setting: ", 1) + ". FLOP-matched dense: 6*h*f = PEER forward FLOPs "
        "per token (query 2hHD + sub-keys 2HnD + experts 4Gh); param-matched: 3hf = 2Gh. Memory: peer_experts alone, "
        "peak bytes of storages created inside forward + backward (TorchDispatchMode), excluding [N, h] table gradients.",
        "", markdown_table(headers, body), "", "Goals:", "", *[f"- {line}" for line in goal_lines], "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.bench_fine_grained import setup_runtime, teardown_runtime

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, _REPO), *(sys.argv[1:] if argv is None else argv)])
    setup_runtime(args.threads)
    machine = machine_description()
    print(f"# {SECTION_TITLE}")
    print(setting_line(args))
    for key, value in machine.items():
        print(f"  {key}: {value}")
    if args.below_protocol:
        print(f"NOTE: --repeats {args.repeats} < {MIN_REPEATS}: below the protocol's minimum, a functional check, not a result")
    print(f"tracker self-check: ok ({tracker_self_check()})", flush=True)

    start = time.perf_counter()
    time_rows: list[dict] = []
    memory_rows: list[dict] = []
    for n in args.sizes:
        if args.what in ("time", "both"):
            time_rows.append(bench_time(args, n))
            _free()
            print(describe_time(time_rows[-1]), flush=True)
        if args.what in ("memory", "both"):
            memory_rows.append(bench_memory(args, n))
            _free()
            print(describe_memory(memory_rows[-1]), flush=True)
    elapsed = time.perf_counter() - start

    headers, body = table(time_rows, memory_rows)
    print()
    print(text_table(headers, body))
    print()
    goal_lines = goals(time_rows, memory_rows)
    print("goals:")
    for line in goal_lines:
        print(f"  {line}")
    print(f"total {elapsed:.0f} s")
    if args.json is not None:
        payload = dict(command=command, machine=machine, elapsed_s=elapsed, below_protocol=args.below_protocol,
                       args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       time=time_rows, memory=memory_rows, goals=goal_lines)
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.json}")
    if args.markdown is not None:
        section = markdown_section(args, machine, command, time_rows, memory_rows, goal_lines, elapsed)
        prefix = "\n" if args.markdown.exists() and args.markdown.stat().st_size else ""
        with open(args.markdown, "a", encoding="utf-8") as handle:
            handle.write(prefix + section)
        print(f"appended results to {args.markdown}")
    teardown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
