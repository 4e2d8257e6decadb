"""`megatron-moe-ext compare --sweep DIR`: the finished runs of a scaling-sweep directory (its runs.json, each
run's checkpoint in RUN/ckpt) are compared with their roles (MoE, dense of equal compute, dense of equal
parameters) written into each trace's metadata, the interventions asked for captured with them, and the
report's research-questions section written. The sweep here is two runs sharing one randomised checkpoint
(the roles are what is under test, not the models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import shared_cache

from megatron_moe_ext.testing import run_distributed
from megatron_moe_ext.testing.random_checkpoint import model_flags, save_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_compare_sweep_writes_roles_and_interventions(tmp_path) -> None:
    run_distributed(save_random_checkpoint, 1, model_flags(), str(tmp_path / "ckpt"))
    sweep = tmp_path / "sweep"
    runs = [{"run": "b_G1_s0", "kind": "moe"}, {"run": "b_dense-compute_s0", "kind": "dense_equal_compute"}]
    for r in runs:
        (sweep / r["run"]).mkdir(parents=True)
        os.symlink(tmp_path / "ckpt", sweep / r["run"] / "ckpt")
    (sweep / "runs.json").write_text(json.dumps({"runs": runs}))
    for name, text in (("a.txt", "abcdefghijklm " * 80), ("b.txt", "nopqrstuvwxyz " * 80)):
        (tmp_path / name).write_text(text)
    env = dict(os.environ, MEGATRON_MOE_EXT_CACHE=shared_cache())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_moe_ext", "compare", "--sweep", str(sweep), "--data", str(tmp_path / "a.txt"),
         str(tmp_path / "b.txt"), "--max-tokens", "512", "--no-hidden", "--interventions", "frozen_paths",
         "--frozen-paths", "1,all", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in runs:
        trace = out / "traces" / r["run"]
        meta = json.loads((trace / "schema.json").read_text())["metadata"]
        assert meta["role"] == r["kind"] and meta["instruments"] == ["frozen_paths"]
        frozen = json.loads((trace / "instruments.json").read_text())["frozen_paths"]
        every = next(v for v in frozen["variants"] if v["name"] == "all observed paths")
        assert every["delta"] == 0.0 and every["tokens"] == 4 * 127
    summary = json.loads((out / "summary.json").read_text())
    assert summary["roles"] == {r["run"]: r["kind"] for r in runs}
    report = (out / "report.md").read_text()
    assert "# The five questions" in report and "## Q4. What role do the many routing paths play?" in report
    assert "all observed paths" in report  # the frozen-paths section of each model
    # --sweep names its models: --checkpoint with it is refused before any rank starts.
    bad = subprocess.run([sys.executable, "-m", "megatron_moe_ext", "compare", "--sweep", str(sweep), "--checkpoint",
                          str(tmp_path / "ckpt"), "--out", str(tmp_path / "r2")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert bad.returncode == 2 and "--sweep with --checkpoint/--name" in bad.stderr and "fix:" in bad.stderr
    assert not (tmp_path / "r2").exists()
