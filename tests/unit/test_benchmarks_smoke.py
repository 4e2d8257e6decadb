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


def test_bench_peer_smoke(tmp_path: Path) -> None:
    import json

    out_json = tmp_path / "peer.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_peer.py"), "--smoke", "--json", str(out_json)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = proc.stdout
    assert "tracker self-check: ok" in out, out
    # Ratio lines per N (smoke sizes 64 and 256): presence only, never values.
    for n in (64, 256):
        assert re.search(rf"N=\s*{n} time  : PEER/dense FLOP-matched \(f=\d+\) time \d+\.\d+ .*"
                         rf"PEER/dense param-matched \(f=\d+\) time \d+\.\d+", out), out
        assert re.search(rf"N=\s*{n} memory: chunked/eager peak extra bytes \d+\.\d+, cpu_fused/eager \d+\.\d+ "
                         rf"\(cpu_fused \d+\.\d+ MiB, chunked \d+\.\d+ MiB, eager \d+\.\d+ MiB", out), out
    assert "goals:" in out and "[time]" in out and "[memory]" in out, out
    payload = json.loads(out_json.read_text())
    assert [row["N"] for row in payload["time"]] == [64, 256]
    assert all(row["result"]["eager"]["peak"] > 0 for row in payload["memory"])


def test_bench_peer_memory_tracker() -> None:
    """The benchmark's storage tracker against known allocations (1 MiB tensor -> peak 1 MiB)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import torch

    from benchmarks.bench_peer import MIB, StoragePeakTracker, tracker_self_check

    tracker_self_check()  # SystemExit on a mismatch
    with StoragePeakTracker() as tracker:
        a = torch.ones(2**18)  # 1 MiB
        b = a * 2  # another 1 MiB
        del a
        c = b.view(-1)[:10]  # view: no new storage
        del b, c
    assert tracker.peak == 2 * MIB and tracker.live == 0 and tracker.allocations == 2
