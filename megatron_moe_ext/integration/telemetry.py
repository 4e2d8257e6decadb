"""Next to Megatron's training log: a progress line, and GPU telemetry (memory used, power, energy per token, SM clock).

Progress (always): every ``--log-interval`` iterations the last rank prints one short line after Megatron's,
``progress: iteration 40/300 (13%) | loss 4.1021 | 10,240 tokens/s | 0:03:12 left``, the loss averaged over
the interval (the first key of Megatron's loss dict, ``lm loss``), tokens/s of the whole job over the interval
(wall clock between two lines, so evaluation and checkpointing in between count) and the time left at that
rate (``--train-iters`` runs; sample-based runs from ``--train-samples``).

GPU telemetry: every ``--log-interval`` iterations the last rank (the one that prints Megatron's iteration line)
samples its GPU through NVML (``nvidia-ml-py``, imported as ``pynvml``) and prints one line
right after Megatron's, and writes the same values to the TensorBoard writer when Megatron has one
(``--tensorboard-dir``), under ``gpu/*``.

Seam: none exists. ``megatron.training.training.training_log`` builds its console line as a local
string and offers no callback (its own ``--log-energy`` covers energy per iteration only, through
a private monitor), so the integration table's row ``telemetry`` wraps that module attribute, which
``train()`` looks up at each call; the original runs unchanged and first.

Energy per token is this GPU's energy over the interval divided by the tokens this GPU's share of
the job processed, ``E_gpu / (tokens / world_size)``: for ranks that draw alike it equals the
whole job's energy per token. NVML's counter is cumulative millijoules since driver load
(``nvmlDeviceGetTotalEnergyConsumption``, Volta and newer).

Without NVML (package missing, no driver) on a GPU host the row prints one notice on rank 0 and keeps only the
progress line; on a CPU host (no GPU to sample) it says nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

try:  # optional dependency, guarded once (nvidia-ml-py)
    import pynvml

    HAVE_NVML = True
except ImportError:
    pynvml = None
    HAVE_NVML = False

NOTICE_PREFIX = "> megatron-moe-ext telemetry:"
_STATE: dict[str, Any] = {"noticed": False}


@dataclasses.dataclass(frozen=True)
class GpuSample:
    """One NVML reading of one GPU."""

    memory_used_bytes: int
    """Device memory in use (all processes), bytes."""
    power_w: float
    """Instantaneous board power, watts."""
    energy_mj: float
    """Cumulative energy since the driver loaded, millijoules."""
    sm_clock_mhz: float
    """Current SM clock, MHz."""


class Sampler(Protocol):
    """Anything that returns a ``GpuSample`` for the local GPU (NVML, or a fake in tests)."""

    def sample(self) -> GpuSample: ...


class NvmlSampler:
    """``GpuSample``s of one device through NVML."""

    def __init__(self, device_index: int) -> None:
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)

    def sample(self) -> GpuSample:
        """Read memory, power, the energy counter and the SM clock now."""
        memory = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
        return GpuSample(
            memory_used_bytes=int(memory.used),
            power_w=pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0,  # NVML reports milliwatts
            energy_mj=float(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)),
            sm_clock_mhz=float(pynvml.nvmlDeviceGetClockInfo(self._handle, pynvml.NVML_CLOCK_SM)),
        )


def interval_metrics(
    previous: GpuSample | None, current: GpuSample, *, tokens: int, world_size: int
) -> dict[str, float]:
    """Metrics of one logging interval, from the samples at its start and end (pure).

    ``tokens`` are the tokens the whole job trained on in the interval. Energy per token is
    ``(current.energy_mj - previous.energy_mj) / 1000 / (tokens / world_size)`` joules; it is left out
    for the first interval (no ``previous``) and when ``tokens`` is not positive.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    metrics = {
        "gpu/memory_used_gib": current.memory_used_bytes / 2**30,
        "gpu/power_w": current.power_w,
        "gpu/sm_clock_mhz": current.sm_clock_mhz,
    }
    if previous is not None and tokens > 0:
        energy_j = (current.energy_mj - previous.energy_mj) / 1000.0
        metrics["gpu/energy_per_token_j"] = energy_j / (tokens / world_size)
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """The console line, in Megatron's ``name: value |`` style."""
    parts = [
        f" gpu memory used (GiB): {metrics['gpu/memory_used_gib']:.2f} |",
        f" gpu power (W): {metrics['gpu/power_w']:.1f} |",
    ]
    if "gpu/energy_per_token_j" in metrics:
        parts.append(f" energy per token (mJ/token): {metrics['gpu/energy_per_token_j'] * 1000.0:.3f} |")
    parts.append(f" sm clock (MHz): {metrics['gpu/sm_clock_mhz']:.0f} |")
    return "".join(parts)


class TelemetryLogger:
    """Samples at each logging interval and reports the interval's metrics."""

    def __init__(self, sampler: Sampler, *, world_size: int) -> None:
        self.sampler = sampler
        self.world_size = world_size
        self._previous: GpuSample | None = None
        self._consumed_samples: int | None = None

    def log(
        self,
        iteration: int,
        *,
        consumed_samples: int,
        seq_length: int,
        print_fn: Callable[[str], None] = print,
        writer: Any = None,
    ) -> dict[str, float]:
        """Sample, print one line and write TensorBoard scalars; returns the metrics.

        ``consumed_samples`` is Megatron's running sample count, so batch-size ramp-up is counted.
        """
        current = self.sampler.sample()
        tokens = 0
        if self._consumed_samples is not None:
            tokens = (consumed_samples - self._consumed_samples) * seq_length
        metrics = interval_metrics(self._previous, current, tokens=tokens, world_size=self.world_size)
        self._previous, self._consumed_samples = current, consumed_samples
        print_fn(f" gpu telemetry at iteration {iteration:8d} |" + format_metrics(metrics))
        if writer is not None:
            for name, value in metrics.items():
                writer.add_scalar(name, value, iteration)
        return metrics


def format_progress(
    iteration: int, *, total_iters: int | None, loss: float | None, tokens_per_s: float | None,
    seconds_left: float | None,
) -> str:
    """The progress line (pure): ``progress: iteration 40/300 (13%) | loss 4.1021 | 10,240 tokens/s | 0:03:12 left``;
    unknown parts (first interval, no loss on this rank, no iteration budget) are left out."""
    parts = [f"progress: iteration {iteration}"]
    if total_iters:
        parts[0] += f"/{total_iters} ({100 * iteration // total_iters}%)"
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tokens/s")
    if seconds_left is not None:
        parts.append(f"{datetime.timedelta(seconds=round(max(0.0, seconds_left)))} left")
    return " " + " | ".join(parts)


class ProgressLogger:
    """Averages the loss over each logging interval and measures its tokens/s; ``clock`` is injectable for tests."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._loss_sum = 0.0
        self._loss_count = 0
        self._last: tuple[float, int, int] | None = None  # (time, iteration, consumed samples) at the last line

    def record(self, loss: Any) -> None:
        """One iteration's loss, a float or a 0-d tensor (summed as a tensor: no device sync per iteration);
        None for a skipped iteration or a rank without the loss."""
        if loss is not None:
            self._loss_sum = self._loss_sum + loss
            self._loss_count += 1

    def start(self, iteration: int, consumed_samples: int) -> None:
        """Start the first interval here (the first logged call), if none is running yet."""
        if self._last is None:
            self._last = (self.clock(), iteration, consumed_samples)

    def line(
        self, iteration: int, *, consumed_samples: int, seq_length: int, train_iters: int | None,
        train_samples: int | None = None,
    ) -> str:
        """The interval's progress line; starts the next interval."""
        now = self.clock()
        loss = float(self._loss_sum) / self._loss_count if self._loss_count else None
        tokens_per_s = seconds_left = None
        if self._last is not None and now > self._last[0] and iteration > self._last[1]:
            elapsed = now - self._last[0]
            samples = consumed_samples - self._last[2]
            tokens_per_s = samples * seq_length / elapsed
            if train_iters:
                seconds_left = (train_iters - iteration) * elapsed / (iteration - self._last[1])
            elif train_samples and samples > 0:
                seconds_left = (train_samples - consumed_samples) * elapsed / samples
        self._loss_sum, self._loss_count = 0.0, 0
        self._last = (now, iteration, consumed_samples)
        return format_progress(iteration, total_iters=train_iters, loss=loss, tokens_per_s=tokens_per_s,
                               seconds_left=seconds_left)


def _first_loss(loss_dict: Any) -> Any:
    """The first entry of Megatron's loss dict (``lm loss``) as a 0-d tensor (or float), or None if empty."""
    for value in (loss_dict or {}).values():
        value = value[0] / value[1] if isinstance(value, tuple) else value
        return value.detach().float().mean() if hasattr(value, "float") else float(value)
    return None


def _notice(message: str) -> None:
    # Once per process, and only on rank 0 (RANK is set by torchrun before any process group).
    if _STATE["noticed"]:
        return
    _STATE["noticed"] = True
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{NOTICE_PREFIX} {message}", flush=True)


def _default_sampler() -> Sampler | None:
    """NVML on this rank's GPU (``LOCAL_RANK``), or None after one notice when NVML or a GPU is missing."""
    import torch

    if not torch.cuda.is_available():  # a CPU host: no GPU to sample, nothing to say
        return None
    if not HAVE_NVML:
        _notice("nvidia-ml-py (pynvml) is not installed; GPU telemetry is off (pip install nvidia-ml-py)")
        return None
    try:
        return NvmlSampler(int(os.environ.get("LOCAL_RANK", "0")))
    except Exception as err:  # pynvml.NVMLError: no driver or no such device
        _notice(f"NVML is unavailable ({err}); GPU telemetry is off")
        return None


def wrap_training_log(original):
    """Row ``telemetry``: Megatron's ``training_log``, then on the last rank every ``--log-interval`` iterations
    the progress line and, where NVML samples a GPU, the telemetry line."""
    sampler = _STATE.pop("sampler", None) or _default_sampler()
    telemetry = None if sampler is None else TelemetryLogger(sampler, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    progress = ProgressLogger()

    @functools.wraps(original)
    def training_log_with_progress(*args: Any, **kwargs: Any) -> Any:
        from megatron.training import get_args, get_tensorboard_writer
        from megatron.training.utils import is_last_rank

        loss_dict = kwargs["loss_dict"] if "loss_dict" in kwargs else args[0]
        skipped = kwargs["skipped_iter"] if "skipped_iter" in kwargs else args[6]
        last_rank = is_last_rank()
        if last_rank and not skipped:
            progress.record(_first_loss(loss_dict))  # before the original, which may reset its accumulators
        result = original(*args, **kwargs)
        margs = get_args()
        iteration = kwargs["iteration"] if "iteration" in kwargs else args[3]
        if not last_rank or not margs.log_interval:
            return result
        consumed = int(margs.consumed_train_samples)
        if iteration % margs.log_interval == 0:
            print(progress.line(iteration, consumed_samples=consumed, seq_length=int(margs.seq_length),
                                train_iters=margs.train_iters, train_samples=margs.train_samples), flush=True)
            if telemetry is not None:
                telemetry.log(
                    iteration, consumed_samples=consumed, seq_length=int(margs.seq_length),
                    print_fn=lambda line: print(line, flush=True), writer=get_tensorboard_writer(),
                )
        else:
            progress.start(iteration, consumed)
        return result

    return training_log_with_progress


def install_telemetry(sampler: Sampler | None = None) -> bool:
    """Install the ``telemetry`` row alone (rank setups install it with the whole ``training`` group),
    with ``sampler`` instead of NVML if given; True if it is in place."""
    from megatron_moe_ext.integration.installer import install, installed

    if sampler is not None:
        _STATE["sampler"] = sampler
    install(("training",), only=("telemetry",))
    _STATE.pop("sampler", None)
    return "telemetry" in installed()
