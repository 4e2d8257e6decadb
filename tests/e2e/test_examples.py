"""The shipped examples that can run on CPU, at their tiny size (``TINY=1``); the GPU ones are
syntax-checked only (they need GPUs, NCCL, SLURM: their headers say so)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_example(tmp: Path, name: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TINY="1", MEGATRON_MOE_EXT=f"{sys.executable} -m megatron_moe_ext",
               MEGATRON_MOE_EXT_CACHE=str(tmp / "cache"), OUT=str(tmp / "sweep"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(["bash", str(EXAMPLES / name)], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def test_cpu_quickstart(tmp_path) -> None:
    out = run_example(tmp_path, "cpu_quickstart.sh").stdout
    assert "iteration        5/       5" in out and "lm loss:" in out
    assert (tmp_path / "tiny" / "quickstart" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"


def test_granularity_sweep_is_compute_matched(tmp_path) -> None:
    out = run_example(tmp_path, "granularity_sweep.sh").stdout
    for report in ("4 experts x 256, top-2", "16 experts x 64, top-8", "64 experts x 16, top-32"):
        assert report in out, f"{report!r} missing from the sweep's accounting reports"
    assert out.count("iteration        3/       3") == 3


def test_peer_model(tmp_path) -> None:
    out = run_example(tmp_path, "peer_model.sh").stdout
    assert "iteration        5/       5" in out and "lm loss:" in out
    assert "PEER" in out, "no PEER layer in the accounting report"


@pytest.mark.parametrize("name", ["gpu_8x_fp8.sh", "slurm_multinode.sbatch"])
def test_gpu_examples_are_valid_bash_and_say_they_were_not_run(name) -> None:
    subprocess.run(["bash", "-n", str(EXAMPLES / name)], check=True)
    assert "NOT RUN" in (EXAMPLES / name).read_text()
