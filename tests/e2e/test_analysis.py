"""Routing analysis end to end: the granularity-study recipe (examples/granularity_sweep.sh at its tiny size)
trains G = 1, 4, 16 and a dense model of equal compute, then `megatron-moe-ext compare` captures a trace of
each checkpoint (one gloo job) and writes the report. Checked here: the report's numbers are the statistics of
the traces, the figures are real images, and bad input fails before any rank starts, leaving nothing behind."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_cache
from test_examples import run_example

from megatron_moe_ext.analysis import TraceReader, load_stats
from megatron_moe_ext.analysis.report import fmt

MODELS = ("G1", "G4", "G16", "dense")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sweep")
    proc = run_example(tmp, "granularity_sweep.sh")
    return {"tmp": tmp, "out": tmp / "sweep", "stdout": proc.stdout}


def test_sweep_is_compute_matched(sweep) -> None:
    out = sweep["stdout"]
    for report in ("4 experts x 256, top-2", "16 experts x 64, top-8", "64 experts x 16, top-32"):
        assert report in out, f"{report!r} missing from the sweep's accounting reports"
    assert out.count("iteration        3/       3") == 4  # G = 1, 4, 16 and the dense model


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_compare_report_matches_the_traces(sweep) -> None:
    report_dir = sweep["out"] / "compare"
    summary = json.loads((report_dir / "summary.json").read_text())
    report = (report_dir / "report.md").read_text()
    assert list(summary["models"]) == list(MODELS)
    # Figures exist and are images of real size.
    pngs = sorted((report_dir / "figures").glob("*.png"))
    assert len(pngs) >= 4 + 3, [p.name for p in pngs]
    for png in pngs:
        w, h = _png_size(png)
        assert w >= 300 and h >= 200, (png.name, w, h)
    for name in MODELS:
        model = summary["models"][name]
        reader = TraceReader(report_dir / "traces" / name)
        assert model["num_tokens"] == reader.num_tokens == 2048
        assert model["label_names"] == ["stdlib asyncio", "stdlib email", "stdlib json", "stdlib logging"]
        for layer in model["layers"]:
            ids = reader.load_layer(layer["layer"]).expert_ids_TK
            stats = load_stats(np.bincount(ids.reshape(-1), minlength=layer["num_experts"]))
            assert layer["max_violation"] == pytest.approx(stats.max_violation, rel=1e-12)
            assert layer["dead_count"] == stats.dead_count
            # The report prints the JSON values: find this model/layer's row of the load table.
            row = re.search(rf"^\| {name} \| {layer['layer']} \| {layer['num_experts']} \|.*$", report, re.M)
            assert row is not None, f"no load row for {name} layer {layer['layer']}"
            assert f"| {fmt(layer['max_violation'])} |" in row.group(0)
            assert f"| {fmt(layer['entropy_nats'])} |" in row.group(0)
    assert [la["num_experts"] for la in summary["models"]["G16"]["layers"]] == [64, 64]
    assert [la["num_experts"] for la in summary["models"]["dense"]["layers"]] == [1, 1]  # dense = one expert
    # CKA: every pair of models on the same tokens, self-similarity with a unit diagonal.
    pairs = {(c["model_a"], c["model_b"]): c for c in summary["cka"]}
    for i, a in enumerate(MODELS):
        assert np.allclose(np.diag(pairs[(a, a)]["matrix"]), 1.0)
        for b in MODELS[i + 1:]:
            m = np.array(pairs[(a, b)]["matrix"])
            assert m.shape == (2, 2) and np.all((m > 0) & (m <= 1 + 1e-9)), (a, b, m)
    assert not summary["cka_skipped"]


def _cli(argv: list[str], capsys) -> str:
    """Runs `megatron-moe-ext analyze|compare` in this process; returns stderr of its usage error."""
    from megatron_moe_ext.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_input_fails_before_any_rank_starts(sweep, tmp_path, capsys) -> None:
    out = sweep["out"]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "report.md").write_text("an earlier report")
    err = _cli(["analyze", "--checkpoint", str(out / "G4"), "--out", str(existing)], capsys)
    assert "already exists" in err and "never overwritten" in err
    assert (existing / "report.md").read_text() == "an earlier report"
    err = _cli(["analyze", "--checkpoint", str(out / "dense"), "--out", str(tmp_path / "r1")], capsys)
    assert "no MoE layers" in err
    err = _cli(["analyze", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "r2")], capsys)
    assert "latest_checkpointed_iteration.txt" in err
    err = _cli(["analyze", "--checkpoint", str(out / "G4"), "--iteration", "7", "--out", str(tmp_path / "r3")], capsys)
    assert "iteration 7 is not in" in err and "iter_0000003" in err
    labels = tmp_path / "labels.txt"
    labels.write_text("0 1 " * 10)
    err = _cli(["analyze", "--checkpoint", str(out / "G4"), "--labels-file", str(labels), "--max-tokens", "1024",
                "--cache-dir", shared_cache(), "--out", str(tmp_path / "r4")], capsys)
    assert "has 20 labels but the analysed data has 1024 tokens" in err
    err = _cli(["compare", "--checkpoint", str(out / "G4"), "--out", str(tmp_path / "r5")], capsys)
    assert "two or more --checkpoint" in err
    err = _cli(["analyze", "--checkpoint", str(out / "G4"), "--nproc", "2", "--ep", "3", "--out",
                str(tmp_path / "r6")], capsys)
    assert "--nproc 2 is not a multiple" in err
    # Nothing was written: no report directories, no temporary siblings.
    assert sorted(os.listdir(tmp_path)) == ["existing", "labels.txt"]
