"""The balancing benchmarks run end to end at tiny sizes (values are never asserted):
``benchmarks/balancing_behaviour.py`` (1 training run of 2 iterations) and
``benchmarks/bench_balancing_overhead.py --smoke``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import shared_cache

REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "MEGATRON_MOE_EXT_CACHE": shared_cache(),
    }


def test_balancing_behaviour_smoke(tmp_path: Path) -> None:
    markdown = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "balancing_behaviour.py"), "--iters", "2",
         "--variants", "dense none", "--markdown", str(markdown)],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "| dense none |" in proc.stdout, proc.stdout
    section = markdown.read_text()
    assert section.startswith("\n## Balancing behaviour: MaxVio per method")
    assert "| variant | flags | MaxVio it 1 |" in section and "Goals:" in section


def test_bench_balancing_overhead_smoke(tmp_path: Path) -> None:
    markdown = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_balancing_overhead.py"), "--smoke", "--markdown", str(markdown)],
        cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    for name in ("dense expert", "dense sequence", "dense global_expert (+ step end)", "dense metrics (+ step end)",
                 "pk subkey"):
        assert f"- {name}: overhead " in proc.stdout, proc.stdout
    section = markdown.read_text()
    assert "## Balancing overhead on one MoE layer (CPU)" in section
    assert "| variant | median fwd+bwd (ms) |" in section
