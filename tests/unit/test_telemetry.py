"""The telemetry row: the progress line (loss, tokens/s, time left) with a fake clock; GPU telemetry: one notice
without NVML on a GPU host, none on CPU; the interval math and formatting with a fake sampler."""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext.integration import telemetry
from megatron_moe_ext.integration.telemetry import (
    GpuSample,
    ProgressLogger,
    TelemetryLogger,
    format_metrics,
    format_progress,
    interval_metrics,
)


class FakeSampler:
    """Returns prepared samples in order (the NVML sampler's interface)."""

    def __init__(self, samples: list[GpuSample]) -> None:
        self.samples = list(samples)

    def sample(self) -> GpuSample:
        return self.samples.pop(0)


def sample(energy_mj: float, *, power_w: float = 300.0) -> GpuSample:
    return GpuSample(memory_used_bytes=3 * 2**30, power_w=power_w, energy_mj=energy_mj, sm_clock_mhz=1980.0)


@pytest.mark.skipif(telemetry.HAVE_NVML, reason="nvidia-ml-py is installed here")
def test_without_nvml_the_row_keeps_the_progress_line_silently_on_cpu(capsys, monkeypatch) -> None:
    monkeypatch.setitem(telemetry._STATE, "noticed", False)
    monkeypatch.delenv("RANK", raising=False)
    import megatron.training.training as training

    original = training.training_log
    monkeypatch.setattr(training, "training_log", original)  # restored after the test
    capsys.readouterr()  # importing Megatron logs to stderr; only telemetry's own output counts
    assert telemetry.install_telemetry() is True
    wrapped = training.training_log
    assert telemetry.install_telemetry() is True and training.training_log is wrapped  # a second call adds nothing
    assert wrapped is not original and wrapped.__wrapped__ is original
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # no GPU, nothing to say about NVML


def test_without_nvml_on_a_gpu_host_one_notice(capsys, monkeypatch) -> None:
    monkeypatch.setitem(telemetry._STATE, "noticed", False)
    monkeypatch.setattr(telemetry, "HAVE_NVML", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("RANK", raising=False)
    assert telemetry._default_sampler() is None and telemetry._default_sampler() is None
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith(telemetry.NOTICE_PREFIX) and "nvidia-ml-py" in lines[0]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_line_loss_tokens_per_second_and_time_left() -> None:
    clock = FakeClock()
    progress = ProgressLogger(clock=clock)
    progress.record(5.0)
    progress.start(1, consumed_samples=16)  # the first logged iteration starts the interval
    for loss in (torch.tensor([4.0]), torch.tensor(3.0)):  # Megatron's loss dict holds tensors
        clock.now += 2.0
        progress.record(loss)
    line = progress.line(3, consumed_samples=48, seq_length=128, train_iters=10)
    # 32 samples x 128 tokens in 4 s; 7 iterations left at 2 s each; loss averaged over the interval's 3 records.
    assert line == " progress: iteration 3/10 (30%) | loss 4.0000 | 1,024 tokens/s | 0:00:14 left"
    clock.now += 10.0
    progress.record(2.0)
    assert progress.line(4, consumed_samples=64, seq_length=128, train_iters=10) == (
        " progress: iteration 4/10 (40%) | loss 2.0000 | 205 tokens/s | 0:01:00 left")


def test_progress_line_parts_that_are_unknown_are_left_out() -> None:
    progress = ProgressLogger(clock=FakeClock())
    assert progress.line(1, consumed_samples=8, seq_length=4, train_iters=None) == " progress: iteration 1"
    assert format_progress(7, total_iters=None, loss=1.5, tokens_per_s=None, seconds_left=3725.4) == (
        " progress: iteration 7 | loss 1.5000 | 1:02:05 left")


def test_progress_time_left_of_a_sample_based_run() -> None:
    clock = FakeClock()
    progress = ProgressLogger(clock=clock)
    progress.start(1, consumed_samples=10)
    clock.now += 5.0
    line = progress.line(2, consumed_samples=20, seq_length=1, train_iters=None, train_samples=120)
    assert line.endswith("| 2 tokens/s | 0:00:50 left")


def test_interval_metrics_energy_per_token() -> None:
    # 2 GPUs; this GPU spent 600 J over an interval of 4096 job tokens (2048 per GPU).
    metrics = interval_metrics(sample(1_000_000.0), sample(1_600_000.0), tokens=4096, world_size=2)
    assert metrics["gpu/energy_per_token_j"] == pytest.approx(600.0 / 2048)
    assert metrics["gpu/memory_used_gib"] == pytest.approx(3.0)
    assert metrics["gpu/power_w"] == 300.0 and metrics["gpu/sm_clock_mhz"] == 1980.0


def test_first_interval_has_no_energy_per_token() -> None:
    assert "gpu/energy_per_token_j" not in interval_metrics(None, sample(5.0), tokens=100, world_size=1)
    assert "gpu/energy_per_token_j" not in interval_metrics(sample(1.0), sample(5.0), tokens=0, world_size=1)
    with pytest.raises(ValueError, match="world_size=0"):
        interval_metrics(None, sample(5.0), tokens=1, world_size=0)


def test_format_metrics_line() -> None:
    line = format_metrics(interval_metrics(sample(0.0), sample(2048.0), tokens=1024, world_size=1))
    assert line == (
        " gpu memory used (GiB): 3.00 | gpu power (W): 300.0 | energy per token (mJ/token): 2.000 |"
        " sm clock (MHz): 1980 |"
    )


class FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, name: str, value: float, step: int) -> None:
        self.scalars.append((name, value, step))


def test_logger_counts_tokens_from_consumed_samples() -> None:
    logger = TelemetryLogger(FakeSampler([sample(0.0), sample(8_192_000.0)]), world_size=4)
    printed: list[str] = []
    writer = FakeWriter()
    logger.log(10, consumed_samples=160, seq_length=128, print_fn=printed.append, writer=writer)
    metrics = logger.log(20, consumed_samples=320, seq_length=128, print_fn=printed.append, writer=writer)
    # 160 samples x 128 tokens = 20480 job tokens, 5120 per GPU; 8192 J on this GPU -> 1.6 J/token.
    assert metrics["gpu/energy_per_token_j"] == pytest.approx(1.6)
    assert printed[1].startswith(" gpu telemetry at iteration       20 |") and "1600.000" in printed[1]
    assert ("gpu/energy_per_token_j", pytest.approx(1.6), 20) in writer.scalars
