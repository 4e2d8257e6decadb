"""Routing dynamics end to end: `train --routing-checkpoints 0,2,4` saves model-only torch_dist checkpoints during a
6-iteration demo run (2 gloo ranks, EP=2), `megatron-moe-ext dynamics` captures each one and the final checkpoint
on the same tokens and writes the router-saturation report; bad input is refused before any rank starts.

Legend: T tokens, K selections per token.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_cache

from megatron_moe_ext.analysis.dynamics import topk_overlap
from megatron_moe_ext.analysis.report import fmt
from megatron_moe_ext.analysis.trace_format import TraceReader

TRAIN = ["--train-iters", "6", "--lr-warmup-iters", "1", "--eval-interval", "100", "--eval-iters", "0",
         "--save-interval", "100", "--routing-checkpoints", "0,2,4"]


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEGATRON_MOE_EXT_CACHE=shared_cache())
    proc = subprocess.run([sys.executable, "-m", "megatron_moe_ext", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _in_process(*argv: str) -> tuple[int, str]:
    """A command whose launcher refuses before starting ranks, run in this process: (exit code, stderr)."""
    from megatron_moe_ext.cli import main

    err, cache = io.StringIO(), os.environ.get("MEGATRON_MOE_EXT_CACHE")
    os.environ["MEGATRON_MOE_EXT_CACHE"] = shared_cache()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(list(argv))
            except SystemExit as exit_:
                code = exit_.code
    finally:
        if cache is None:
            os.environ.pop("MEGATRON_MOE_EXT_CACHE", None)
        else:
            os.environ["MEGATRON_MOE_EXT_CACHE"] = cache
    return code, err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("dynamics")
    _cli("train", *TRAIN, "--save", str(tmp / "run"), cwd=tmp)
    _cli("dynamics", "--run", str(tmp / "run"), "--out", str(tmp / "dyn"), "--max-tokens", "2048",
         "--nproc", "2", "--ep", "2", cwd=tmp)
    return {"tmp": tmp, "run": tmp / "run", "out": tmp / "dyn"}


def _state_keys(iter_dir: Path) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata)


def test_routing_checkpoints_are_model_only_torch_dist(run) -> None:
    routing = run["run"] / "routing"
    assert sorted(p.name for p in routing.glob("iter_*")) == ["iter_0000000", "iter_0000002", "iter_0000004"]
    final_keys = _state_keys(run["run"] / "iter_0000006")
    assert any(".optimizer." in k for k in final_keys)  # the run's own checkpoint has the optimizer
    for it in routing.glob("iter_*"):
        assert json.loads((it / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
        keys = _state_keys(it)
        assert not any("optimizer." in k or k.startswith("rng_state") for k in keys), it
        model = ("decoder.", "embedding.", "output_layer.")
        assert {k for k in keys if k.startswith(model)} == {k for k in final_keys if k.startswith(model)}


def test_saturation_report_matches_the_traces(run) -> None:
    out = run["out"]
    doc = json.loads((out / "summary.json").read_text())
    d = doc["dynamics"]
    assert d["iterations"] == [0, 2, 4, 6] and d["final_iteration"] == 6
    assert d["tokens_per_iteration"] == 16 * 128 and d["tokens"] == [0, 4096, 8192, 12288]
    assert sorted(d["layers"]) == ["1", "2"]
    report = (out / "report.md").read_text()
    for layer, c in d["layers"].items():
        assert c["saturation"][-1] == 1.0 and c["load_distance"][-1] == 0.0
        assert c["chance_saturation"] == 0.5  # top-2 of 4 experts
        final = TraceReader(out / "traces" / "iter_0000006").load_layer(int(layer)).expert_ids_TK
        for i, it in enumerate(d["iterations"][:-1]):
            ids_TK = TraceReader(out / "traces" / f"iter_{it:07d}").load_layer(int(layer)).expert_ids_TK
            assert ids_TK.shape == final.shape == (2048, 2)
            assert c["saturation"][i] == pytest.approx(float(topk_overlap(ids_TK, final).mean()), abs=1e-12)
            assert 0.0 <= c["saturation"][i] <= 1.0
        row = f"| {layer} | saturation | " + " | ".join(fmt(v) for v in c["saturation"]) + " |"
        assert row in report
    # The initial weights route differently from the trained ones (the curve measures something).
    assert any(c["saturation"][0] < 1.0 for c in d["layers"].values())
    png = (out / "figures" / "dynamics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] >= 300


def test_bad_input_refused_before_any_rank(run, tmp_path) -> None:
    from megatron_moe_ext.testing.distributed import run_distributed
    from megatron_moe_ext.testing.random_checkpoint import model_flags, save_random_checkpoint

    out = str(tmp_path / "never")
    code, err = _in_process("dynamics", "--run", str(run["run"]), "--iterations", "3", "--out", out)
    assert code == 2 and "--iterations [3] were not saved" in err and "saved: [0, 2, 4]" in err
    no_routing = tmp_path / "no_routing"
    shutil.copytree(run["run"], no_routing, ignore=shutil.ignore_patterns("routing"))
    code, err = _in_process("dynamics", "--run", str(no_routing), "--out", out)
    assert code == 2 and "has no routing checkpoints" in err and "--routing-checkpoints" in err
    code, err = _in_process("dynamics", "--run", str(run["run"]), "--out", str(run["out"]))
    assert code == 2 and "already exists" in err
    code, _ = _in_process("dynamics", "--run", str(run["run"]), "--out", out, "--dry-run")
    assert code == 0
    # A checkpoint of another model (hidden size 32) among the routing checkpoints.
    mixed = tmp_path / "mixed"
    shutil.copytree(run["run"], mixed)
    run_distributed(save_random_checkpoint, 1, model_flags("--hidden-size", "32"), str(mixed / "routing"),
                    iteration=3)
    code, err = _in_process("dynamics", "--run", str(mixed), "--out", out)
    assert code == 2 and "are different models (hidden_size 32 vs 64" in err and "fix:" in err
    # train: a routing checkpoint at or after the last iteration.
    code, err = _in_process("train", "--train-iters", "6", "--routing-checkpoints", "2,6", "--save",
                            str(tmp_path / "t"), "--dry-run")
    assert code == 2 and "--routing-checkpoints 6 >= --train-iters 6" in err
    assert not os.path.exists(out)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    assert not leftovers
    np.testing.assert_equal(sorted(p.name for p in (run["run"] / "routing").glob("iter_*")),
                            ["iter_0000000", "iter_0000002", "iter_0000004"])
