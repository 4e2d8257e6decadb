"""Run real megatron-core code on CPU with gloo (the supported range: ``_compat.SUPPORTED_MEGATRON_CORE``).

megatron-core assumes CUDA in many places. ``enable_cpu_runtime()`` covers each of them so that
GPTModel with MoE layers, both token dispatchers (allgather, alltoall), TP with sequence parallelism,
EP, PP, DDP with the DistributedOptimizer, ``finalize_model_grads``, torch_dist checkpoints and
``megatron.training.pretrain`` run unchanged on CPU. Nothing is enabled on import, and it refuses to
run where CUDA is available or with a megatron-core release it was not verified against.

Call sites covered, and why (``mc`` = megatron/core, ``mt`` = megatron/training, 0.19.2). This module holds
the torch-level half (torch's CUDA API stand-ins, the device mode, the autograd hook, the allocator);
every replacement of a *Megatron* attribute (items 5-8 and 12, and the all-to-all wrapper of item 6) is a
``cpu`` row of the integration table (``megatron_moe_ext/integration/table.py``, wrappers in
``integration/cpu.py``), installed from here through ``integration.install``:

1. ``device='cuda'`` literals and ``torch.cuda.current_device()`` used as a device: optimizers
   (``mc/optimizer/optimizer.py`` found_inf/_scale, ``grad_scaler.py``, ``clip_grads.py``), DDP
   warm-up (``param_and_grad_buffer.py``), ``mt/training.py`` start-time all-reduces,
   ``mt/checkpointing.py`` iteration all-reduce, RoPE (``rotary_pos_embedding.py``), model
   construction. A ``TorchFunctionMode`` (``_CpuDeviceMode``) rewrites every CUDA device argument
   of a torch call to ``cpu`` and makes ``Tensor.cuda()`` a no-op; ``torch.cuda.current_device()``
   returns 0, which the mode maps to ``cpu`` like any CUDA index.
2. ``Tensor.type()`` string checks (``distrib_optimizer.py:401/466``, ``optimizer.py:1009/1028``,
   ``clip_grads.py:174``) accept only ``torch.cuda.*Tensor``: the mode reports CPU tensors'
   types with the ``torch.cuda.`` prefix (only the no-argument form; conversions are untouched).
3. ``torch.cuda.device_count()`` gates model-parallel initialisation and RNG seeding
   (``mt/initialize.py:270,358,447``): it returns 1 and ``set_device`` is a no-op. We do *not*
   fake ``torch.cuda.is_available()``: torch.compile/dynamo and many fast paths key on it.
4. Streams, events and synchronisation (``token_dispatcher``, DDP overlap, timers): host-side
   no-op stand-ins (CPU kernels are synchronous). ``torch.cuda.memory_*`` statistics, which the
   training log reports after the first iterations, read 0: there is no device allocator.
5. The CUDA RNG tracker (``mc/tensor_parallel/random.py``: ``_get_cuda_rng_state``,
   ``_set_cuda_rng_state``, ``torch.cuda.get_rng_state/set_rng_state/manual_seed``, and
   ``mt/checkpointing.py`` rng state): all map to the CPU generator, the one that CPU kernels
   draw from, so ``tracker.fork()`` really switches the stream that dropout and init use and a
   checkpoint's saved "cuda" RNG state is the one that matters on resume. The tracker's warning
   "CPU RNG state changed within GPU RNG context" is then expected and filtered.
6. alltoall split sizes (``token_dispatcher.py:913`` -> ``mc/tensor_parallel/mappings.py:450``):
   ``maybe_move_tensor_to_cpu(as_numpy=True)`` converts only CUDA tensors, so on CPU the splits
   reach ``dist.all_to_all_single`` as tensors, which its binding rejects. We wrap
   ``torch.distributed.all_to_all_single`` to pass tensor split sizes as lists.
7. ``initialize_megatron`` asserts CUDA unless ``allow_no_cuda=True`` (``mt/initialize.py:64``);
   ``pretrain`` calls it without that flag, so ``mt.training.initialize_megatron`` gets it bound.
   ``set_jit_fusion_options`` warms fusions up on ``device="cuda"`` with nvfuser settings: skipped.
   ``compile_helpers`` runs ``make`` on dataset helpers the wheel ships prebuilt without their
   Makefile, so rank 0 would exit: skipped (the prebuilt ``helpers_cpp`` is used).
8. DistributedOptimizer resume without TE/apex (``distrib_optimizer.py:838``): torch Adam keeps
   ``step`` per parameter, but the optimizer's ``init_state_fn`` (used at load to build the state
   layout) creates ``exp_avg``/``exp_avg_sq`` without it, and at resume ``state_dict()`` is called
   before any step, with no state at all, so it asserts ``len(steps) == 1`` on an empty list. We
   complete ``init_state_fn``'s state with ``step = 0`` and run it when ``state_dict()`` finds the
   state empty: that is exactly the state torch Adam creates on its first step, and
   ``load_state_dict`` then overwrites it with the saved values. With fp32 params the resume then
   copies the saved values into main params that are views of leaf parameters requiring grad
   (``distrib_optimizer.py:1225``), which autograd forbids outside ``no_grad``: that method runs
   under ``torch.no_grad()`` (a state copy has no gradient meaning). Finally the restored Adam
   ``step`` is wrong twice over: the per-parameter value is copied back as 0 from the bucket state,
   and ``load_state_dict`` gives all parameters one shared step tensor, which torch Adam's foreach
   update increments once per parameter. After loading, each parameter gets its own step tensor
   holding the checkpoint's ``param_groups`` step.
9. Custom autograd ``backward()`` methods (e.g. ``mappings.py:145`` allocating the SP all-gather
   output on ``torch.cuda.current_device()``) are run by the autograd engine outside the caller's
   torch-function mode stack, so ``BackwardCFunction.apply`` is wrapped to enter the mode too.
10. Torch distributed checkpointing's ``state_dict_saver`` calls ``torch.cuda.current_device()``
   for its metadata exchange: covered by (1).

No built-in norm supports sequence parallelism without TE/apex (``WrappedTorchNorm`` asserts);
that is a layer, not a runtime shim: see ``megatron_moe_ext.layers.norms``.

Not a Megatron call site but part of running it well on CPU: 11. glibc's allocator hands buffers
above its mmap threshold (32 MiB at most, dynamic) back to the OS on free, so every large
activation or gradient of every step is page-faulted in afresh (measured on the 2-core machine:
a 128 MiB alloc+fill 100-340 ms fresh vs 10 ms reused). ``enable_cpu_runtime`` raises the mmap
threshold to 1 GiB and the trim threshold to 16 GiB with ``mallopt`` (glibc only), so freed memory
stays in the heap for reuse: resident memory stays near the peak of the step. Set
``MEGATRON_MOE_EXT_KEEP_MALLOC=1`` to leave the allocator alone.

12. With TP or CP > 1, ``validate_args`` (``mt/arguments.py:1414``) asks
   ``get_device_arch_version()``, which reads the properties of ``cuda:0`` and fails without a
   driver: it reports 0 (pre-Blackwell), whose only demand, ``CUDA_DEVICE_MAX_CONNECTIONS=1``,
   means nothing on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import threading
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megatron_moe_ext._compat import check_megatron_core_version
from megatron_moe_ext.integration.installer import install

__all__ = ["enable_cpu_runtime", "cpu_runtime_enabled", "filter_harmless_cpu_messages", "init_gloo_from_env"]

_LOCK = threading.Lock()
_ENABLED = False
_MODE: TorchFunctionMode | None = None

_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU; see the module docstring, items 1 and 2."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            name = _CUDA_TYPE_NAMES.get(tensor.dtype)
            if name is not None and tensor.device.type == "cpu":
                return name
        elif func is torch.Tensor.cuda:
            return args[0]
        elif func is torch.Tensor.to:
            if args[1:] and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


class _NullStream:
    """Host-side stand-in for ``torch.cuda.Stream``: CPU ops complete before they return."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_NullEvent":
        return event if event is not None else _NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _NullEvent:
    """Host-side stand-in for ``torch.cuda.Event``, timing with the host clock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._t = 0.0

    def record(self, stream: Any = None) -> None:
        import time

        self._t = time.perf_counter()

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_NullEvent") -> float:
        return (end._t - self._t) * 1000.0


_NULL_STREAM = _NullStream()


class _RngWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.device_count = lambda: 1
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NullStream  # type: ignore[misc]
    cuda.Event = _NullEvent  # type: ignore[misc]
    cuda.current_stream = lambda device=None: _NULL_STREAM
    cuda.default_stream = lambda device=None: _NULL_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_stream = lambda stream: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all (a lazy no-op without CUDA), so
    # only the single-device seed is redirected, straight to the CPU generator.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.max_memory_reserved = lambda device=None: 0
    cuda.is_current_stream_capturing = lambda: False
    torch.nn.Module.cuda = lambda self, device=None: self  # type: ignore[method-assign]


def _patch_autograd_backward() -> None:
    original = torch.autograd.function.BackwardCFunction.apply

    @functools.wraps(original)
    def apply(self, *args):
        if torch._C._len_torch_function_stack() > 0:
            return original(self, *args)
        with _CpuDeviceMode():
            return original(self, *args)

    torch.autograd.function.BackwardCFunction.apply = apply


def _filter_rng_warning() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    logging.getLogger(mp_random.__name__).addFilter(_RngWarningFilter())


# Known-harmless third-party messages on a CPU host, silenced by exact message and origin (never globally):
# (kind, origin, message regex, why it is harmless here). kind "warning": a warnings.warn whose module matches
# ``origin`` (a regex); kind "log": a record of the logger named ``origin``.
HARMLESS_CPU_MESSAGES: tuple[tuple[str, str, str, str], ...] = (
    ("warning", r"megatron\.", r"Transformer Engine and Apex are not installed\. Falling back to",
     "CPU has neither: the torch optimizers and local multi-tensor helpers are the CPU implementations"),
    ("warning", r"megatron\.", r"Apex is not installed\. Falling back to Torch Norm",
     "torch norms are the CPU norms (ours add sequence parallelism: layers/norms.py)"),
    ("warning", r"megatron\.core\.extensions\.transformer_engine_spec_provider",
     r"Only transformer-engine>=1\.7\.0 supports MoE experts, but your version is 0\.0\.0",
     "no TE on CPU: the local expert implementation is the intended one"),
    ("warning", r"megatron\.core\.hyper_comm_grid", r"absl\.logging is not installed",
     "Megatron then logs through the standard logging module, which is what we configure"),
    ("warning", r"megatron\.core\.models\.mimo", r"MimoModelConfig is experimental",
     "imported by megatron.core.optimizer for multimodal models; never used by a GPT run"),
    ("warning", r"torch\.utils\.data\.dataloader", r"'pin_memory' argument is set as true but no accelerator",
     "Megatron always asks for pinned memory; without an accelerator there is nothing to pin"),
    ("warning", r"torch\.distributed", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
     r"deprecated", "Megatron's DDP/optimizer call sites; the calls work in the torch versions we support"),
    ("warning", r"(megatron\.core\.optimizer\.optimizer|megatron_moe_ext\.runtime\.cpu)",
     r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
     "DistributedOptimizer.zero_grad reads .grad of fp32 shard main params, which are views (Megatron's own "
     "comment: 'throws grad-access warning'); reported at our device mode, which forwards the access"),
    ("warning", r"megatron\.core\._rank_utils",
     r"Could not determine rank from torch\.distributed, RANK, or SLURM_PROCID\. Defaulting to rank 0",
     "raised in the launcher, which runs Megatron's argument checks before any rank exists (it is rank 0 for "
     "printing); every rank has RANK, set by torchrun or start_local_ranks"),
    ("log", "torch.utils.cpp_extension", r"No CUDA runtime is found",
     "torch's extension builder probes CUDA at import; we build no CUDA extension on CPU"),
    ("log", "megatron.core.models.gpt.gpt_model", r"GPTModel IS DEPRECATED",
     "GPTModel is megatron-core 0.19's GPT model and what megatron.training builds; the notice is about the future"),
    ("log", "megatron.core.rerun_state_machine", r"Setting RerunStateMachine mode RerunMode\.",
     "Megatron switches result validation off and on around every evaluation and logs each switch as a warning"),
    ("log", "megatron.core.dist_checkpointing.strategies.torch", r"MCore's async save is deprecated",
     "logged whenever the torch_dist save strategy is built, async save or not"),
)


class _MessageFilter(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self._pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self._pattern.search(record.getMessage()) is None


_FILTERED: set[tuple[str, str]] = set()


def filter_harmless_cpu_messages() -> None:
    """Silence ``HARMLESS_CPU_MESSAGES`` in this process (idempotent). Called by ``enable_cpu_runtime`` and, before
    Megatron is imported, by the ``megatron-moe-ext`` command on a host without CUDA."""
    for kind, origin, pattern, _why in HARMLESS_CPU_MESSAGES:
        if kind == "warning":  # warnings.filterwarnings replaces an equal filter: no duplicates
            warnings.filterwarnings("ignore", message=pattern, module=origin)
        elif (origin, pattern) not in _FILTERED:
            _FILTERED.add((origin, pattern))
            logging.getLogger(origin).addFilter(_MessageFilter(pattern))


def _tune_allocator() -> bool:
    """Keep freed large buffers in glibc's heap (docstring item 11); False where not applied."""
    if os.environ.get("MEGATRON_MOE_EXT_KEEP_MALLOC") == "1":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 34))


def cpu_runtime_enabled() -> bool:
    """True once ``enable_cpu_runtime()`` has run in this process."""
    return _ENABLED


def enable_cpu_runtime(*, allow_with_cuda: bool = False) -> None:
    """Let megatron-core run on CPU with gloo in this process. Idempotent.

    Call it before building models or calling ``megatron.training.pretrain``. It raises
    ValueError for an unsupported megatron-core release, and RuntimeError when CUDA is available
    (a GPU job must never silently run on CPU) unless ``allow_with_cuda=True``.
    """
    global _ENABLED, _MODE
    with _LOCK:
        if _ENABLED:
            return
        check_megatron_core_version()
        if torch.cuda.is_available() and not allow_with_cuda:
            raise RuntimeError(
                "CUDA is available: megatron_moe_ext will not switch megatron-core to its CPU runtime. "
                "Fix: run on the GPU (do not call enable_cpu_runtime), or pass allow_with_cuda=True "
                "to force CPU execution."
            )
        _patch_torch_cuda()
        # Megatron's own call sites: the `cpu` rows of the integration table (integration/table.py).
        install(("cpu",))
        _filter_rng_warning()
        filter_harmless_cpu_messages()
        _patch_autograd_backward()
        _MODE = _CpuDeviceMode()
        # Entered for the life of the process: the device literals sit deep in Megatron's calls.
        _MODE.__enter__()
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        _tune_allocator()
        _ENABLED = True


def init_gloo_from_env(timeout_s: float = 300.0) -> None:
    """Initialise the default process group with gloo from torchrun-style environment variables."""
    import datetime

    if dist.is_initialized():
        return
    dist.init_process_group(
        backend="gloo",
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        timeout=datetime.timedelta(seconds=timeout_s),
    )
