"""GPU telemetry: one notice without NVML; the interval math and formatting with a fake sampler."""

from __future__ import annotations

import pytest

from megatron_moe_ext.integration import telemetry
from megatron_moe_ext.integration.telemetry import GpuSample, TelemetryLogger, format_metrics, interval_metrics


class FakeSampler:
    """Returns prepared samples in order (the NVML sampler's interface)."""

    def __init__(self, samples: list[GpuSample]) -> None:
        self.samples = list(samples)

    def sample(self) -> GpuSample:
        return self.samples.pop(0)


def sample(energy_mj: float, *, power_w: float = 300.0) -> GpuSample:
    return GpuSample(memory_used_bytes=3 * 2**30, power_w=power_w, energy_mj=energy_mj, sm_clock_mhz=1980.0)


@pytest.mark.skipif(telemetry.HAVE_NVML, reason="nvidia-ml-py is installed here")
def test_without_nvml_one_notice_and_nothing_installed(capsys, monkeypatch) -> None:
    monkeypatch.setitem(telemetry._STATE, "noticed", False)
    monkeypatch.delenv("RANK", raising=False)
    import megatron.training.training as training

    original = training.training_log
    capsys.readouterr()  # importing Megatron logs to stderr; only telemetry's own output counts
    assert telemetry.install_telemetry() is False
    assert telemetry.install_telemetry() is False  # a second call adds nothing
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith(telemetry.NOTICE_PREFIX) and "nvidia-ml-py" in lines[0]
    assert out.err == ""
    assert training.training_log is original


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
