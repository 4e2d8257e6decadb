"""Fast GPU benchmarks of the GPU check (``scripts/gpu_check.sh``, docs/gpu-check.md), one Markdown table of ratios.

Each row is one ratio measured in this run on this device, with its goal (issue #20) and a verdict:

* fine-grained experts (``FineGrainedExperts``, backend 'grouped', ``kernels/expert_mlp.py``) vs Megatron's
  ``SequentialMLP`` and vs the dense-GEMM bound (one dense MLP over all tokens with the experts' GEMM FLOPs:
  [T, H] x [H, k0*F_dense], two GEMMs), at expert sizes 2048 down to 32 (constant active and total parameters:
  E*G experts of F_dense/G, top-k0*G), forward + backward, bf16. Goals: ours/SequentialMLP time <= 0.8 at expert
  size <= 256; ours/dense bound time <= 1.3 at expert size >= 512;
* FP8 (``kernels/fp8_experts.expert_mlp_fp8``, torch path) vs bf16 (``expert_mlp_grouped``) on the same tensors at
  each expert size, forward + backward. Goal: bf16/FP8 time > 1 at expert size >= 256, >= 1.14 (Megatron's
  reported FP8 gain) at expert size >= 1024;
* PEER at N = 1M experts (``kernels/peer_triton.py``): achieved gather bandwidth of the forward (u and v rows read
  per pair) as a fraction of the device's datasheet HBM peak (goal >= 0.6) and of a measured device-to-device
  copy; its time against a FLOP-matched dense FFN (context, no goal);
* the product-key router (``layers/product_key_router.py``) vs Megatron's ``TopKRouter`` at 64K experts,
  forward + backward (goal: >= 10x faster);
* NVML telemetry next to torch's allocator: the rise of NVML's used memory when torch reserves 1 GiB, over that
  1 GiB (goal: within 10%), with both readings shown.

Timing (``time_interleaved``): every compared function is called once per round, the order alternating between
rounds; on CUDA each call is timed by a pair of CUDA events (synchronised after the round), on CPU by the wall
clock; warm-up rounds first, then the median of ``repeats`` >= 20 rounds. Every fast path is checked against its
reference (outputs, relative error) before it is timed.

``--dry-run`` (or no CUDA) runs the same code at tiny sizes on CPU: CPU values are shown but not judged, and what
needs CUDA (Triton PEER, HBM fractions, NVML, FP8 where the torch path refuses CPU tensors) is reported as
"skipped (needs CUDA)". ``--versions`` prints the versions block instead.

Time on an H100 (estimate from sizes: the fine-grained sweep ~7 x 25 rounds of at most ~0.1 s for SequentialMLP
at 512 experts, plus building 67M-parameter modules on CPU, ~60 s; FP8 ~10 s; PEER ~15 s including Triton's
compile; router ~30 s including building the 64K x 1024 gate on CPU; together well under 3 minutes). Dry run on
the 2-core VM: ~30 s, most of it importing Megatron.

Legend: T tokens, H hidden size, F expert hidden size (F_dense the dense FFN's), E experts (E0 * G), G granularity,
N token rows grouped by expert (= T * k), h PEER hidden size, P (token, expert) pairs, NT PEER table rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Mapping

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")

# HBM peak bandwidth by device name, bytes/s, from NVIDIA's datasheets: "NVIDIA H100 Tensor Core GPU" datasheet
# (H100 SXM 3.35 TB/s, H100 PCIe 2.0 TB/s, H100 NVL 3.9 TB/s) and "NVIDIA H200 Tensor Core GPU" datasheet
# (H200 SXM and NVL 4.8 TB/s). Matched in this order on the lower-cased name torch reports.
HBM_PEAK_BYTES_PER_S: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h200",), 4.8e12),
    (("h100", "pcie"), 2.0e12),
    (("h100", "nvl"), 3.9e12),
    (("h100",), 3.35e12),  # SXM5 (reported as "NVIDIA H100 80GB HBM3")
)

FULL = dict(tokens=8192, hidden=2048, ffn=2048, expert_sizes=[2048, 1024, 512, 256, 128, 64, 32], expansion=8,
            base_topk=1, peer_tokens=8192, peer_hidden=1024, peer_side=1024, peer_heads=8, peer_topk=16,
            router_tokens=4096, router_hidden=1024, router_experts=65536, router_topk=8, router_key_dim=128,
            copy_bytes=1 << 30, repeats=20, warmup=3)
DRY = dict(tokens=64, hidden=32, ffn=64, expert_sizes=[64, 32], expansion=4, base_topk=1, peer_tokens=64,
           peer_hidden=32, peer_side=16, peer_heads=2, peer_topk=4, router_tokens=64, router_hidden=32,
           router_experts=256, router_topk=4, router_key_dim=16, copy_bytes=1 << 22, repeats=5, warmup=1)
# The dry run checks code paths, not speed: fewer rounds keep it quick on 2 shared cores (--repeats overrides).
MIN_REPEATS = 20
SKIPPED = "skipped (needs CUDA)"
CHECK_REL_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # fast path vs reference, relative error of norms
# FP8 against bf16: e4m3 operands forward (3 mantissa bits) and e5m2 gradients backward (2 bits) give a few
# percent of relative error per tensor (the dry run measured 5e-2 forward, 9e-2 for dx).
FP8_REL_TOL = 0.15


@dataclasses.dataclass
class Row:
    """One line of the report: what was measured, its value, the goal, and PASS / MISS / a reason."""

    section: str
    item: str
    value: str
    goal: str = "-"
    verdict: str = "-"


@dataclasses.dataclass
class Context:
    device: torch.device
    dtype: torch.dtype
    sizes: dict
    repeats: int
    warmup: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ---------------------------------------------------------------------------------------------- versions


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - NVML missing or no driver: try nvidia-smi
        pass
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return "none (no NVML, no nvidia-smi)"
    proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=30, check=False)
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else "unknown"


def versions() -> dict[str, str]:
    """Device, driver, CUDA, torch, Triton, megatron-core and this package, as installed for this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as exc:
        triton_version = f"not available: {exc}"
    def located(module: str, dist: str) -> str:
        # Where the module would be imported from, without importing it (megatron.core takes seconds);
        # the install step of scripts/gpu_check.sh imports both.
        import importlib.util

        try:
            spec = importlib.util.find_spec(module)
        except ImportError as exc:
            return f"not found: {exc}"
        if spec is None or spec.origin is None:
            return "not found"
        return f"{_dist_version(dist)} ({Path(spec.origin).parent})"

    mcore_version = located("megatron.core", "megatron-core")
    ours = located("megatron_moe_ext", "megatron-moe-ext")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, " \
                 f"sm_{props.major}{props.minor}"
    else:
        device = "none (CPU only)"
    return {
        "device": device,
        "driver": _driver_version() if torch.cuda.is_available() else "none (no CUDA)",
        "CUDA (torch build)": str(torch.version.cuda),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version,
        "megatron-core": mcore_version,
        "megatron-moe-ext": ours,
        "torch._grouped_mm": "yes" if hasattr(torch, "_grouped_mm") else "missing",
        "torch._scaled_grouped_mm": "yes" if hasattr(torch, "_scaled_grouped_mm") else "missing",
    }


# ---------------------------------------------------------------------------------------------- timing


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    ctx: Context,
    setup: Callable[[str], object] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each function, interleaved (order alternating by round), after warm-up rounds.

    CUDA: a start and an end event around each call, read after the round's synchronize (so the host never waits
    inside a round). CPU: ``time.perf_counter`` around each call.
    """
    if ctx.repeats < 1:
        raise ValueError(f"repeats={ctx.repeats} must be >= 1")
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(ctx.warmup + ctx.repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        events = {}
        for name in order:
            if setup is not None:
                setup(name)
            if ctx.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                events[name] = (start, end)
            else:
                start_s = time.perf_counter()
                fns[name]()
                events[name] = time.perf_counter() - start_s
        if ctx.cuda:
            torch.cuda.synchronize()
        if round_index >= ctx.warmup:
            for name in names:
                value = events[name]
                times[name].append(value[0].elapsed_time(value[1]) / 1e3 if ctx.cuda else value)
    return {name: statistics.median(values) for name, values in times.items()}


def _sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def _check(what: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    err = relative_error(got, want)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.2e} > {tol:.0e} against the reference")
    return err


def _verdict(ok: bool, ctx: Context) -> str:
    if not ctx.cuda:
        return "not judged (CPU dry run)"
    return "PASS" if ok else "MISS"


def _one_line(text: str, limit: int = 300) -> str:
    """Text fit for a Markdown table cell."""
    return " ".join(text.split()).replace("|", "/")[:limit]


def per_size(section: str, ctx: Context, one_size: Callable[[int], list[Row]]) -> list[Row]:
    """``one_size`` at every expert size; a size that raises becomes an ERROR row and the next size runs."""
    rows: list[Row] = []
    for size in ctx.sizes["expert_sizes"]:
        try:
            rows += one_size(size)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the exit status says it failed
            traceback.print_exc()
            rows.append(Row(section, f"F={size}", _one_line(f"{type(exc).__name__}: {exc}"), "-", "ERROR"))
        _free(ctx)
    return rows


# ---------------------------------------------------------------------------------------------- Megatron setup


def setup_megatron(ctx: Context) -> None:
    """Megatron's model-parallel state on one rank: NCCL on CUDA, gloo with this package's CPU runtime on CPU."""
    if not ctx.cuda:
        from benchmarks.bench_fine_grained import setup_runtime

        setup_runtime(None)
        return
    import torch.distributed as dist

    from megatron_moe_ext.testing.distributed import free_port
    from megatron_moe_ext.testing.tiny import initialize_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    initialize_parallel()


def teardown_megatron() -> None:
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free(ctx: Context) -> None:
    import gc

    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- fine-grained experts


def _granularity_args(ctx: Context) -> argparse.Namespace:
    s = ctx.sizes
    return argparse.Namespace(hidden=s["hidden"], ffn=s["ffn"], expansion=s["expansion"], base_topk=s["base_topk"],
                              tokens=s["tokens"])


def _expert_tensors(ctx: Context, granularity: int, gen: torch.Generator) -> dict:
    """Exactly balanced grouped rows for E0*G experts of F_dense/G, top-k0*G: x_NH, probs_N, grad_NH, counts."""
    s = ctx.sizes
    experts, topk = s["expansion"] * granularity, s["base_topk"] * granularity
    rows = s["tokens"] * topk
    if rows % experts:
        raise ValueError(f"tokens*k = {rows} rows do not split evenly over {experts} experts; fix: change the sizes")
    x_NH = torch.randn(rows, s["hidden"], generator=gen, device=ctx.device).to(ctx.dtype)
    probs_N = torch.rand(rows, generator=gen, device=ctx.device) + 0.5
    grad_NH = torch.randn(rows, s["hidden"], generator=gen, device=ctx.device).to(ctx.dtype)
    return dict(x_NH=x_NH, probs_N=probs_N, grad_NH=grad_NH, counts=[rows // experts] * experts,
                experts=experts, topk=topk, ffn=s["ffn"] // granularity)


def _dense_bound(ctx: Context, gen: torch.Generator, activation: Callable[[torch.Tensor], torch.Tensor]):
    """(run, clear): one dense MLP over all T tokens, hidden k0*F_dense: the experts' GEMM FLOPs as two GEMMs."""
    s = ctx.sizes
    width = s["base_topk"] * s["ffn"]
    x_TH = torch.randn(s["tokens"], s["hidden"], generator=gen, device=ctx.device).to(ctx.dtype).requires_grad_()
    w1_FH = (0.02 * torch.randn(width, s["hidden"], generator=gen, device=ctx.device)).to(ctx.dtype).requires_grad_()
    w2_HF = (0.02 * torch.randn(s["hidden"], width, generator=gen, device=ctx.device)).to(ctx.dtype).requires_grad_()
    grad_TH = torch.randn(s["tokens"], s["hidden"], generator=gen, device=ctx.device).to(ctx.dtype)

    def run() -> None:
        out = torch.nn.functional.linear(activation(torch.nn.functional.linear(x_TH, w1_FH)), w2_HF)
        out.backward(grad_TH)

    def clear() -> None:
        for t in (x_TH, w1_FH, w2_HF):
            t.grad = None

    return run, clear


def bench_fine_grained(ctx: Context) -> list[Row]:
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.process_groups_config import ProcessGroupCollection

    from benchmarks.bench_fine_grained import copy_sequential_into_stacked, make_config
    from megatron_moe_ext.layers.fine_grained_experts import FineGrainedExperts

    args = _granularity_args(ctx)
    pgc = ProcessGroupCollection.use_mpu_process_groups()

    def one_size(size: int) -> list[Row]:
        granularity = ctx.sizes["ffn"] // size
        cfg_meg, cfg_ours = make_config(args, granularity, "megatron"), make_config(args, granularity, "grouped")
        gen = torch.Generator(device=ctx.device).manual_seed(1000 + granularity)
        t = _expert_tensors(ctx, granularity, gen)
        modules = {
            "megatron": LocalSpecProvider().grouped_mlp_modules(False)(t["experts"], cfg_meg, pg_collection=pgc),
            "ours": FineGrainedExperts(t["experts"], cfg_ours, pg_collection=pgc),
        }
        if type(modules["megatron"]).__name__ != "SequentialMLP":
            raise AssertionError(f"Megatron built {type(modules['megatron']).__name__}, not SequentialMLP")
        copy_sequential_into_stacked(modules["megatron"], modules["ours"])
        for module in modules.values():
            module.to(device=ctx.device, dtype=ctx.dtype).train()
        counts_E = torch.tensor(t["counts"], dtype=torch.long)
        x_NH = t["x_NH"].detach().requires_grad_()

        def clear(name: str) -> None:
            x_NH.grad = None
            if name == "dense_bound":
                clear_dense()
            else:
                modules[name].zero_grad(set_to_none=True)

        def step(name: str) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                out, _ = modules[name](x_NH, counts_E, t["probs_N"])
                out.backward(t["grad_NH"])
                return out
            return run

        fns: dict[str, Callable[[], object]] = {name: step(name) for name in ("ours", "megatron")}
        results = {}
        for name in ("megatron", "ours"):
            clear(name)
            out = fns[name]().detach()
            results[name] = (out, x_NH.grad.clone())
        tol = CHECK_REL_TOL[ctx.dtype]
        _check(f"F={size} experts output", results["ours"][0], results["megatron"][0], tol)
        _check(f"F={size} experts input grad", results["ours"][1], results["megatron"][1], tol)
        del results
        fns["dense_bound"], clear_dense = _dense_bound(ctx, gen, cfg_meg.activation_func)
        med = time_interleaved(fns, ctx=ctx, setup=clear)
        vs_seq, vs_dense = med["ours"] / med["megatron"], med["ours"] / med["dense_bound"]
        shape = f"{t['experts']} x {size}, top-{t['topk']}"
        ms = f"ours {1e3 * med['ours']:.3f} ms, SequentialMLP {1e3 * med['megatron']:.3f} ms, " \
             f"dense bound {1e3 * med['dense_bound']:.3f} ms"
        seq_goal = "<= 0.8" if size <= 256 else "- (context)"
        rows = [Row("fine-grained experts", f"F={size} ({shape}): ours/SequentialMLP time",
                        f"{vs_seq:.3f} ({ms})", seq_goal, _verdict(vs_seq <= 0.8, ctx) if size <= 256 else "-")]
        dense_goal = "<= 1.3" if size >= 512 else "- (context)"
        rows.append(Row("fine-grained experts", f"F={size} ({shape}): ours/dense-GEMM bound time", f"{vs_dense:.3f}",
                        dense_goal, _verdict(vs_dense <= 1.3, ctx) if size >= 512 else "-"))
        return rows

    return per_size("fine-grained experts", ctx, one_size)


# ---------------------------------------------------------------------------------------------- FP8 vs bf16


def _load_fp8():
    """``expert_mlp_fp8`` or the import error's text (it may not exist in this version of the package)."""
    try:
        from megatron_moe_ext.kernels.fp8_experts import expert_mlp_fp8
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
        return None, f"{type(exc).__name__}: {exc}"
    return expert_mlp_fp8, ""


def bench_fp8(ctx: Context) -> list[Row]:
    from megatron_moe_ext.kernels.expert_mlp import get_expert_mlp_kernel

    expert_mlp_fp8, error = _load_fp8()
    if expert_mlp_fp8 is None:
        return [Row("FP8 vs bf16", "expert_mlp_fp8", _one_line(f"not available: {error}"), "importable", "MISS")]
    grouped = get_expert_mlp_kernel("grouped")
    activation = torch.nn.functional.gelu

    def one_size(size: int) -> list[Row]:
        granularity = ctx.sizes["ffn"] // size
        gen = torch.Generator(device=ctx.device).manual_seed(2000 + granularity)
        t = _expert_tensors(ctx, granularity, gen)
        hidden = ctx.sizes["hidden"]
        # bf16 on both sides: FP8 quantises bf16 operands (on CPU too, so the dry run compares like with like).
        leaves = {
            "x": t["x_NH"].to(torch.bfloat16),
            "w1": (0.02 * torch.randn(t["experts"], size, hidden, generator=gen, device=ctx.device)).to(torch.bfloat16),
            "w2": (0.02 * torch.randn(t["experts"], hidden, size, generator=gen, device=ctx.device)).to(torch.bfloat16),
        }
        grad_NH = t["grad_NH"].to(torch.bfloat16)
        inputs = {name: {k: v.detach().clone().requires_grad_() for k, v in leaves.items()} for name in ("bf16", "fp8")}
        kernels = {"bf16": grouped, "fp8": expert_mlp_fp8}

        def step(name: str) -> Callable[[], torch.Tensor]:
            def run() -> torch.Tensor:
                a = inputs[name]
                out = kernels[name](a["x"], t["counts"], a["w1"], a["w2"], t["probs_N"], activation)
                out.backward(grad_NH)
                return out
            return run

        def clear(name: str) -> None:
            for v in inputs[name].values():
                v.grad = None

        fns = {name: step(name) for name in kernels}
        label = f"F={size} ({t['experts']} x {size}, top-{t['topk']})"
        try:
            outs = {}
            for name in ("bf16", "fp8"):
                clear(name)
                outs[name] = (fns[name]().detach(), inputs[name]["x"].grad.clone())
        except Exception as exc:  # noqa: BLE001
            if ctx.cuda:
                raise
            return [Row("FP8 vs bf16", f"{label}: bf16/FP8 time", _one_line(f"{SKIPPED}: {type(exc).__name__}: {exc}"),
                        "-", SKIPPED)]
        err_out = _check(f"F={size} FP8 output", outs["fp8"][0], outs["bf16"][0], FP8_REL_TOL)
        err_grad = _check(f"F={size} FP8 input grad", outs["fp8"][1], outs["bf16"][1], FP8_REL_TOL)
        med = time_interleaved(fns, ctx=ctx, setup=clear)
        speedup = med["bf16"] / med["fp8"]
        goal = ">= 1.14" if size >= 1024 else ("> 1" if size >= 256 else "- (context)")
        ok = speedup >= 1.14 if size >= 1024 else speedup > 1.0
        return [Row("FP8 vs bf16", f"{label}: bf16/FP8 time (speed-up)",
                        f"{speedup:.3f} (bf16 {1e3 * med['bf16']:.3f} ms, FP8 {1e3 * med['fp8']:.3f} ms; rel. error "
                        f"out {err_out:.1e}, dx {err_grad:.1e})", goal,
                        _verdict(ok, ctx) if size >= 256 else "-")]

    return per_size("FP8 vs bf16", ctx, one_size)


# ---------------------------------------------------------------------------------------------- bandwidth, PEER


def hbm_peak(name: str) -> float | None:
    lowered = name.lower()
    for keys, peak in HBM_PEAK_BYTES_PER_S:
        if all(k in lowered for k in keys):
            return peak
    return None


def copy_bandwidth(ctx: Context) -> float:
    """Device-to-device copy: bytes read + written per second (median of the repeats)."""
    n = ctx.sizes["copy_bytes"] // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=ctx.device).normal_()
    dst = torch.empty_like(src)
    med = time_interleaved({"copy": lambda: dst.copy_(src)}, ctx=ctx)
    return 2 * src.numel() * src.element_size() / med["copy"]


def bench_bandwidth(ctx: Context) -> tuple[list[Row], float]:
    measured = copy_bandwidth(ctx)
    name = torch.cuda.get_device_name(0) if ctx.cuda else "CPU"
    peak = hbm_peak(name) if ctx.cuda else None
    rows = [Row("memory bandwidth", "device-to-device copy (read + write)", f"{measured / 1e12:.3f} TB/s")]
    if not ctx.cuda:
        rows.append(Row("memory bandwidth", "copy / datasheet HBM peak", SKIPPED, "-", SKIPPED))
    elif peak is None:
        rows.append(Row("memory bandwidth", "copy / datasheet HBM peak", f"unknown device {name!r} (no datasheet entry)"))
    else:
        rows.append(Row("memory bandwidth", f"copy / datasheet HBM peak ({peak / 1e12:.2f} TB/s)",
                        f"{measured / peak:.3f}"))
    return rows, measured


def peer_backend(ctx: Context) -> str:
    """The PEER kernel timed: the Triton kernels on CUDA; on CPU the same harness around the chunked kernel."""
    return "triton" if ctx.cuda else "chunked"


def bench_peer(ctx: Context, copy_bw: float) -> list[Row]:
    from megatron_moe_ext.kernels import peer_triton
    from megatron_moe_ext.kernels.peer_experts import peer_experts
    from megatron_moe_ext.kernels.peer_reference import peer_experts_reference, uniform_offsets

    s = ctx.sizes
    T, h, table = s["peer_tokens"], s["peer_hidden"], s["peer_side"] ** 2
    per_token = s["peer_heads"] * s["peer_topk"]
    P = T * per_token
    if ctx.cuda and not peer_triton.available():
        return [Row("PEER", "Triton kernels", "not available (Triton does not import)", "available", "MISS")]
    backend = peer_backend(ctx)
    gen = torch.Generator(device=ctx.device).manual_seed(3)
    dt = ctx.dtype
    x_Th = torch.randn(T, h, generator=gen, device=ctx.device).to(dt).requires_grad_()
    u_Nh = (torch.randn(table, h, generator=gen, device=ctx.device) / math.sqrt(h)).to(dt).requires_grad_()
    v_Nh = (torch.randn(table, h, generator=gen, device=ctx.device) / math.sqrt(h)).to(dt).requires_grad_()
    ids_P = torch.randint(0, table, (P,), generator=gen, device=ctx.device)
    gates_P = torch.rand(P, generator=gen, device=ctx.device)
    offsets_T1 = uniform_offsets(T, per_token, ctx.device)
    grad_Th = torch.randn(T, h, generator=gen, device=ctx.device).to(dt)
    # The check: the first tokens against the eager reference (fp32 compute on the same rounded values).
    t_check = min(T, 64)
    p_check = t_check * per_token
    with torch.no_grad():
        got = peer_experts(x_Th[:t_check], u_Nh, v_Nh, ids_P[:p_check], gates_P[:p_check], offsets_T1[:t_check + 1],
                           "gelu", backend=backend)
        want = peer_experts_reference(x_Th[:t_check].float(), u_Nh.float(), v_Nh.float(), ids_P[:p_check],
                                      gates_P[:p_check], offsets_T1[:t_check + 1], "gelu")
    err = _check("PEER output", got, want, CHECK_REL_TOL[dt])
    # FLOP-matched dense FFN: a pair costs 2h (dot) + 2h (scaled row) = 4h FLOPs forward, a dense FFN of width W
    # costs 4hW per token, so W = pairs per token.
    width = per_token
    w1_WH = (0.02 * torch.randn(width, h, generator=gen, device=ctx.device)).to(dt).requires_grad_()
    w2_HW = (0.02 * torch.randn(h, width, generator=gen, device=ctx.device)).to(dt).requires_grad_()

    def peer_fwd() -> None:
        with torch.no_grad():
            peer_experts(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, "gelu", backend=backend)

    def peer_fwd_bwd() -> None:
        peer_experts(x_Th, u_Nh, v_Nh, ids_P, gates_P, offsets_T1, "gelu", backend=backend).backward(grad_Th)

    def dense_fwd_bwd() -> None:
        out = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x_Th, w1_WH)), w2_HW)
        out.backward(grad_Th)

    def clear(name: str) -> None:
        for t in (x_Th, u_Nh, v_Nh, w1_WH, w2_HW):
            t.grad = None

    fwd = time_interleaved({"peer_fwd": peer_fwd}, ctx=ctx)["peer_fwd"]
    med = time_interleaved({"peer": peer_fwd_bwd, "dense": dense_fwd_bwd}, ctx=ctx, setup=clear)
    # Forward traffic: a u row and a v row per pair (the gather), plus x read and out written once per token.
    elem = torch.tensor([], dtype=dt).element_size()
    gathered = P * 2 * h * elem
    achieved = (gathered + 2 * T * h * elem) / fwd
    where = f"N={table} experts, h={h}, {T} tokens x {per_token} pairs, {str(dt).removeprefix('torch.')}, " \
            f"backend {backend}"
    rows = [Row("PEER", f"forward ({where}); rel. error vs eager {err:.1e}",
                f"{1e3 * fwd:.3f} ms, gather {achieved / 1e12:.3f} TB/s")]
    peak = hbm_peak(torch.cuda.get_device_name(0)) if ctx.cuda else None
    if not ctx.cuda:
        rows.append(Row("PEER", "gather bandwidth / datasheet HBM peak", SKIPPED, ">= 0.6", SKIPPED))
        rows.append(Row("PEER", "gather bandwidth / measured copy bandwidth", SKIPPED, "- (context)", SKIPPED))
    else:
        if peak is None:
            rows.append(Row("PEER", "gather bandwidth / datasheet HBM peak", "unknown device (no datasheet entry)",
                            ">= 0.6", "MISS"))
        else:
            rows.append(Row("PEER", f"gather bandwidth / datasheet HBM peak ({peak / 1e12:.2f} TB/s)",
                            f"{achieved / peak:.3f}", ">= 0.6", _verdict(achieved / peak >= 0.6, ctx)))
        rows.append(Row("PEER", "gather bandwidth / measured copy bandwidth", f"{achieved / copy_bw:.3f}", "- (context)"))
    rows.append(Row("PEER", f"fwd+bwd PEER/FLOP-matched dense FFN (width {width}) time",
                    f"{med['peer'] / med['dense']:.3f} (PEER {1e3 * med['peer']:.3f} ms, dense "
                    f"{1e3 * med['dense']:.3f} ms)", "- (context)"))
    return rows


# ---------------------------------------------------------------------------------------------- router


def bench_router(ctx: Context) -> list[Row]:
    from benchmarks.bench_router import build

    s = ctx.sizes
    n = s["router_experts"]
    args = argparse.Namespace(hidden=s["router_hidden"], topk=s["router_topk"], key_dim=s["router_key_dim"],
                              query_norm="batchnorm")
    pk, twin, dense = build(args, n)  # built on CPU (use_cpu_initialization), fp32
    for router in (pk, twin, dense):
        router.to(ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(4)
    x = torch.randn(s["router_tokens"], 1, s["router_hidden"], generator=gen, device=ctx.device)
    w = torch.randn(s["router_tokens"], n, generator=gen, device=ctx.device)
    # Exactness: the norm-free twin must route like the TopKRouter holding its full keys (a GEMM in another
    # order may flip a near-tie, so a few differing tokens are allowed on CUDA).
    with torch.no_grad():
        m_twin = twin(x[:64])[1]
        m_dense = dense(x[:64])[1]
    same = (m_twin == m_dense).all(-1).float().mean().item()
    if same < (0.9 if ctx.cuda else 1.0):
        raise AssertionError(f"product-key routing equals the equivalent TopKRouter's on only {same:.0%} of tokens")
    del twin
    routers = {"topk": dense, "product_key": pk}
    inputs: dict[str, torch.Tensor] = {}

    def setup(name: str) -> None:
        routers[name].zero_grad(set_to_none=True)
        inputs[name] = x.clone().requires_grad_(True)

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            probs, _ = routers[name](inputs[name])
            probs.backward(w)
        return run

    med = time_interleaved({name: step(name) for name in routers}, ctx=ctx, setup=setup)
    speedup = med["topk"] / med["product_key"]
    return [Row("product-key router", f"TopKRouter/product-key time at N={n} (T={s['router_tokens']}, hidden "
                f"{s['router_hidden']}, top-{s['router_topk']}, fwd+bwd, fp32; routing equal on {same:.0%} of checked "
                "tokens)", f"{speedup:.2f}x (TopKRouter {1e3 * med['topk']:.3f} ms, product-key "
                f"{1e3 * med['product_key']:.3f} ms)", ">= 10x", _verdict(speedup >= 10.0, ctx))]


# ---------------------------------------------------------------------------------------------- telemetry


def bench_telemetry(ctx: Context) -> list[Row]:
    if not ctx.cuda:
        return [Row("telemetry", "NVML used memory vs torch allocator", SKIPPED, "-", SKIPPED)]
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())

    def read() -> tuple[int, int, int]:
        torch.cuda.synchronize()
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used, torch.cuda.memory_reserved(), torch.cuda.memory_allocated()

    torch.cuda.empty_cache()
    used0, reserved0, allocated0 = read()
    block = torch.empty(1 << 30, dtype=torch.uint8, device=ctx.device)
    used1, reserved1, allocated1 = read()
    del block
    torch.cuda.empty_cache()
    if reserved1 == reserved0:
        raise AssertionError("torch reserved no new memory for a 1 GiB tensor after empty_cache(); cannot compare")
    rise = (used1 - used0) / (reserved1 - reserved0)
    gib = 2**30
    return [
        Row("telemetry", "NVML used / torch reserved / torch allocated (GiB), before",
            f"{used0 / gib:.2f} / {reserved0 / gib:.2f} / {allocated0 / gib:.2f} (outside torch's cache: "
            f"{(used0 - reserved0) / gib:.2f})"),
        Row("telemetry", "rise of NVML used / rise of torch reserved, allocating 1 GiB", f"{rise:.3f}",
            "0.9 .. 1.1", _verdict(0.9 <= rise <= 1.1, ctx)),
    ]


# ---------------------------------------------------------------------------------------------- report


SECTIONS: tuple[str, ...] = ("bandwidth", "fine-grained experts", "FP8 vs bf16", "PEER", "product-key router",
                             "telemetry")


def run_all(ctx: Context) -> tuple[list[Row], list[str]]:
    """Every section in turn; a section that raises becomes an ERROR row and the next one runs."""
    rows: list[Row] = []
    copy_bw = float("nan")
    megatron_ready = False
    for section in SECTIONS:
        start = time.perf_counter()
        try:
            if section in ("fine-grained experts", "product-key router") and not megatron_ready:
                setup_megatron(ctx)
                megatron_ready = True
            if section == "bandwidth":
                new, copy_bw = bench_bandwidth(ctx)
            elif section == "fine-grained experts":
                new = bench_fine_grained(ctx)
            elif section == "FP8 vs bf16":
                new = bench_fp8(ctx)
            elif section == "PEER":
                new = bench_peer(ctx, copy_bw)
            elif section == "product-key router":
                new = bench_router(ctx)
            else:
                new = bench_telemetry(ctx)
        except Exception as exc:  # noqa: BLE001 - reported, then the next section runs
            traceback.print_exc()
            new = [Row(section, "(section failed)", _one_line(f"{type(exc).__name__}: {exc}"), "-", "ERROR")]
        _free(ctx)
        print(f"[{section}] {time.perf_counter() - start:.1f} s", flush=True)
        for row in new:
            print(f"  {row.item}: {row.value} | goal {row.goal} | {row.verdict}", flush=True)
        rows += new
    if megatron_ready:
        teardown_megatron()
    errors = [f"{r.section}, {r.item}: {r.value}" for r in rows if r.verdict == "ERROR"]
    return rows, errors


def markdown(rows: list[Row], ctx: Context, elapsed_s: float) -> str:
    from benchmarks.common import markdown_table

    mode = "CUDA" if ctx.cuda else "CPU dry run (tiny sizes, values not judged)"
    head = [f"Benchmarks: {mode}, {str(ctx.dtype).removeprefix('torch.')}; CUDA-event timing on CUDA (wall clock on "
            f"CPU), {ctx.warmup} warm-up rounds, median of {ctx.repeats} interleaved rounds; {elapsed_s:.0f} s.", "", ""]
    table = markdown_table(["section", "measurement", "value", "goal", "verdict"],
                           [[r.section, r.item, r.value, r.goal, r.verdict] for r in rows])
    return "\n".join(head) + table + "\n"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU (also chosen when CUDA is absent)")
    parser.add_argument("--versions", action="store_true", help="print the versions as Markdown list items and exit")
    parser.add_argument("--markdown", type=Path, default=None, help="write the benchmark table to this file")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed rounds, >= {MIN_REPEATS} (default {FULL['repeats']}; the dry run {DRY['repeats']})")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < MIN_REPEATS:
        parser.error(f"--repeats {args.repeats}: the protocol needs >= {MIN_REPEATS}; fix: pass --repeats "
                     f"{MIN_REPEATS} or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.versions:
        for key, value in versions().items():
            print(f"- {key}: {value}")
        return 0
    cuda = torch.cuda.is_available() and not args.dry_run
    sizes = FULL if cuda else DRY
    ctx = Context(device=torch.device("cuda" if cuda else "cpu"), dtype=torch.bfloat16 if cuda else torch.float32,
                  sizes=sizes, repeats=args.repeats or sizes["repeats"], warmup=sizes["warmup"])
    if not cuda:
        print("no CUDA (or --dry-run): tiny sizes on CPU; CUDA-only items are reported as skipped", flush=True)
    start = time.perf_counter()
    rows, errors = run_all(ctx)
    text = markdown(rows, ctx, time.perf_counter() - start)
    print(text)
    if args.markdown is not None:
        _write_atomic(args.markdown, text)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
