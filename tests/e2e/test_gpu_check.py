"""The prepared GPU check's dry run (scripts/gpu_check.sh --dry-run, docs/gpu-check.md): what CI runs so the
script cannot rot between GPU loans. One run (module fixture, ~75 s on the 2-core VM): exit status 0, one Markdown
report with the versions, every step ok, every benchmark row present (a value, or "skipped (needs CUDA)"), and
the wheels it built under the carry limit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import gpu_check  # noqa: E402

CARRY_LIMIT_MIB = 64  # what one device call may carry, the working tree included
SKIPPED = "skipped (needs CUDA)"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check-out")
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHONPATH")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)
    return proc, out


def report(dry_run) -> str:
    proc, out = dry_run
    path = out / "gpu_check.md"
    assert path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return path.read_text(encoding="utf-8")


def table_rows(text: str) -> list[list[str]]:
    """The benchmark table's body rows as cells (section, measurement, value, goal, verdict)."""
    lines = text.splitlines()
    start = lines.index("| section | measurement | value | goal | verdict |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_dry_run_exits_zero_and_prints_the_report(dry_run) -> None:
    proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "## GPU check (dry run on CPU" in proc.stdout
    assert report(dry_run).strip() in proc.stdout  # the block printed is the block written


def test_report_holds_the_versions_and_every_step(dry_run) -> None:
    text = report(dry_run)
    assert text.count("## ") == 1, "one Markdown block"
    for key in ("device", "driver", "CUDA (torch build)", "torch", "triton", "megatron-core", "megatron-moe-ext"):
        assert re.search(rf"^- {re.escape(key)}: \S", text, re.M), key
    assert re.search(r"^- megatron-core: 0\.19\.\d", text, re.M)
    for step in ("install wheels", "versions", "gpu test tier", "benchmarks"):
        assert re.search(rf"^\| {step}[^|]* \| ok \| \d+ \|$", text, re.M), step
    # On CPU the gpu tier is collected and skipped (tests/conftest.py), none deselected by mistake.
    summary = re.search(r"^gpu test tier: (\d+) skipped, \d+ deselected", text, re.M)
    assert summary and int(summary.group(1)) > 0, text
    assert "Overall: all steps ok" in text


def test_every_benchmark_row_is_present(dry_run) -> None:
    rows = table_rows(report(dry_run))
    assert all(len(r) == 5 for r in rows), rows
    assert not [r for r in rows if r[4] == "ERROR"], rows
    items = {(r[0], r[1]): r for r in rows}

    def row(section: str, prefix: str) -> list[str]:
        found = [r for (s, item), r in items.items() if s == section and item.startswith(prefix)]
        assert len(found) == 1, (section, prefix, rows)
        return found[0]

    for size in gpu_check.DRY["expert_sizes"]:
        for what in ("ours/SequentialMLP time", "ours/dense-GEMM bound time"):
            matching = [r for (s, item), r in items.items() if s == "fine-grained experts"
                        and item.startswith(f"F={size} ") and item.endswith(what)]
            assert len(matching) == 1, (size, what)
            assert re.match(r"^\d+\.\d{3}", matching[0][2]), matching[0]
        fp8 = row("FP8 vs bf16", f"F={size} ")
        assert re.match(r"^\d+\.\d{3} ", fp8[2]) or fp8[2].startswith(SKIPPED), fp8
    assert re.match(r"^\d+\.\d{3} TB/s$", row("memory bandwidth", "device-to-device copy")[2])
    assert row("memory bandwidth", "copy / datasheet HBM peak")[2] == SKIPPED
    assert re.search(r"backend chunked\); rel\. error vs eager", row("PEER", "forward")[1])
    for prefix in ("gather bandwidth / datasheet HBM peak", "gather bandwidth / measured copy"):
        assert row("PEER", prefix)[2] == SKIPPED
    assert re.match(r"^\d+\.\d{3} \(PEER", row("PEER", "fwd+bwd PEER/FLOP-matched dense FFN")[2])
    router = row("product-key router", "TopKRouter/product-key time")
    assert re.match(r"^\d+\.\d{2}x \(TopKRouter", router[2]) and router[3] == ">= 10x", router
    assert row("telemetry", "NVML")[2] == SKIPPED


def test_wheels_stay_under_the_carry_limit(dry_run) -> None:
    _, out = dry_run
    log = (out / "install.log").read_text(encoding="utf-8")
    found = re.search(r"wheels in \S+: ([\d.]+) MiB in all", log)
    assert found, log
    assert float(found.group(1)) < CARRY_LIMIT_MIB - 4, "leave room for the working tree in the 64 MiB carry"
    assert "megatron.core from" in log and "megatron_moe_ext from" in log  # imported from the installed wheels


def test_bad_arguments_exit_2() -> None:
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "fix: --out DIR" in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--fast"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--repeats", "5"])
    assert exc.value.code == 2


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H100 NVL", 3.9e12),
    ("NVIDIA H200", 4.8e12), ("NVIDIA A100-SXM4-80GB", None),
])
def test_hbm_peak_by_device_name(name: str, peak: float | None) -> None:
    assert gpu_check.hbm_peak(name) == peak
