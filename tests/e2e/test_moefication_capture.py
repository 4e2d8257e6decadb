"""MoEfication through `megatron-moe-ext analyze --readouts moefication` on a real torch_dist checkpoint (a random
2-layer model: layer 1 a dense SwiGLU FFN, layer 2 an MoE layer of 4 experts, top-2, saved at EP=2): the dense
side (clusters, shares, losses with only the kept clusters) and the MoE side (the routed top-k's share of the
all-experts output, the all-experts loss) are equal at EP=2 and EP=1, land in summary.json and report.md, and the
oracle clusters carry more of the output than random ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_cache


def _analyze(tmp: Path, ckpt: Path, out: str, nproc: int, ep: int) -> dict:
    env = dict(os.environ, MEGATRON_MOE_EXT_CACHE=shared_cache())
    proc = subprocess.run([sys.executable, "-m", "megatron_moe_ext", "analyze", "--checkpoint", str(ckpt),
                           "--readouts", "moefication", "--max-tokens", "2048", "--nproc", str(nproc), "--ep", str(ep),
                           "--out", str(tmp / out)], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / out / "summary.json").read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    from megatron_moe_ext.testing.distributed import run_distributed
    from megatron_moe_ext.testing.random_checkpoint import model_flags, save_random_checkpoint

    tmp = tmp_path_factory.mktemp("moefication")
    run_distributed(save_random_checkpoint, 2, model_flags("--moe-layer-freq", "([0,1])", ep=2), str(tmp / "ckpt"))
    return {"tmp": tmp, "ep2": _analyze(tmp, tmp / "ckpt", "ep2", 2, 2),
            "ep1": _analyze(tmp, tmp / "ckpt", "ep1", 1, 1)}


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}/{i}")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path


def test_equal_at_ep2_and_ep1(results) -> None:
    a, b = results["ep2"]["models"]["ckpt"]["moefication"], results["ep1"]["models"]["ckpt"]["moefication"]
    _close(a, b)


def test_dense_and_moe_sides(results) -> None:
    r = results["ep2"]["models"]["ckpt"]["moefication"]
    dense = r["dense"]["layers"]["1"]
    assert dense["cluster_sizes"] == [32] * 8  # 256 neurons, 8 equal clusters
    assert dense["share_topk"]["mean"] > dense["share_random"]["mean"]
    lo, hi = dense["share_topk"]["ci95"]
    assert lo <= dense["share_topk"]["mean"] <= hi
    # windows 0, 4, 8, 12 (of 16 windows of 128 tokens) calibrate; 12 windows x 127 next-token losses measured
    assert r["clean_loss"]["windows"] == 12 and r["clean_loss"]["tokens"] == 12 * 127
    assert r["dense"]["calibration_tokens"] == 4 * 128
    moe = r["moe"]["layers"]["2"]
    assert moe["top_k"] == 2 and moe["num_experts"] == 4 and 0.0 < moe["share_routed"]["mean"] <= 1.0
    md = (results["tmp"] / "ep2" / "report.md").read_text()
    assert "## moefication" in md and "| 2 | 4 | 2 |" in md
