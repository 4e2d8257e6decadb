"""The fine-grained benchmark runs end to end at tiny sizes (timings are never asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_fine_grained.py"


def test_bench_fine_grained_smoke(tmp_path: Path) -> None:
    markdown = tmp_path / "results.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--smoke",
            "--granularities", "1", "4", "--tokens", "64", "--hidden", "32", "--ffn", "64",
            "--repeats", "1", "--warmup", "0", "--markdown", str(markdown),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = proc.stdout
    # One ratio line per (G, benchmark): ratios only are checked for presence, never for value.
    for g in (1, 4):
        for what in ("experts", "layer"):
            assert re.search(rf"G=\s*{g} {what}\s*: ours/megatron time \d+\.\d+ \| speed-up megatron/ours \d+\.\d+x", out), out
    assert "efficiency retention" in out and "goals:" in out, out
    section = markdown.read_text()
    assert section.startswith("## Fine-grained experts vs SequentialMLP (CPU)")
    assert "| benchmark | G |" in section


def test_bench_router_smoke(tmp_path: Path) -> None:
    markdown = tmp_path / "results.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_router.py"), "--smoke", "--markdown", str(markdown)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "speed-up" in proc.stdout and "goal" in proc.stdout, proc.stdout
    assert "| N | n | topk ms |" in markdown.read_text()
