"""`megatron-moe-ext fit` and `megatron-moe-ext plan` end to end: a results table in the sweep's format -> fit --json
--plot -> plan --law-json; the preset plan; refusals exit 2 naming the values and the fix; no megatron-core import.

Legend: N params, D tokens, G granularity; TRUE the coefficients the synthetic table is drawn from.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_moe_ext import cli
from megatron_moe_ext.scaling import laws

ROOT = Path(__file__).resolve().parents[2]
TRUE = {"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "g": 2.1, "gamma": 0.58, "c": 0.47}
HEADER = ["run", "kind", "seed", "budget_flops", "params", "total_params", "tokens", "granularity", "experts", "topk",
          "expansion_rate", "flops", "loss", "best_loss", "final_train_loss", "iterations"]


def _run(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_info:
        return int(exit_info.code)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A sweep-format results table: MoE rows from the Krajewski law with 0.3% noise, plus two dense rows."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("sweep") / "results.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        i = 0
        for n in (1e8, 3e8, 1e9, 3e9):
            for d in (1e9, 4e9, 16e9):
                for g in (1, 4, 16):
                    loss = float(laws.krajewski2024_loss(n, d, g, **TRUE)) * float(np.exp(rng.normal(0, 0.003)))
                    writer.writerow([f"r{i}", "moe", 0, 6 * n * d, n, 8 * n, d, g, 8 * g, g, 8, 6 * n * d, loss, loss,
                                     loss, 100])
                    i += 1
        for n in (1e8, 1e9):
            writer.writerow([f"dense{n:g}", "dense_equal_compute", 0, 6 * n * 4e9, n, n, 4e9, "", "", "", "",
                             6 * n * 4e9, 3.5, 3.5, 3.5, 100])
    return path


def test_fit_writes_the_coefficients_json_and_plot_then_plan_reads_it(results, tmp_path, capsys) -> None:
    out, png = tmp_path / "law.json", tmp_path / "fit.png"
    code = _run(["fit", str(results), "--law", "krajewski2024", "--json", str(out), "--plot", str(png),
                 "--bootstrap", "10", "--starts", "small", "--seed", "3"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "36 points" in printed and "2 dense rows left out" in printed and "held-out RMSE" in printed
    data = json.loads(out.read_text())
    assert data["law"] == "krajewski2024" and data["heldout"] == "leave-one-out" and data["n_points"] == 36
    assert set(data["coefficients"]) == set(TRUE) == set(data["intervals"])
    assert data["confidence"] == 0.9 and data["params"] == "active"
    assert 0 < data["rmse"] <= data["heldout_rmse"] < 0.03
    assert abs(data["coefficients"]["alpha"] - TRUE["alpha"]) < 0.03
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary file left behind

    plan_json = tmp_path / "plan.json"
    code = _run(["plan", "--flops", "1e20", "--law-json", str(out), "--expansion-rates", "8", "--json", str(plan_json)])
    printed = capsys.readouterr().out
    assert code == 0 and "predicted loss" in printed and "FLOPs per token" in printed
    plan = json.loads(plan_json.read_text())
    assert plan["compute_model"] == "accounting" and plan["experts"] == 8 * plan["granularity"]
    assert plan["tokens"] * plan["flops_per_token"] == pytest.approx(1e20)


def test_plan_with_the_preset_prints_the_papers_optimum(capsys) -> None:
    assert _run(["plan", "--flops", "6.46e21"]) == 0
    printed = capsys.readouterr().out
    assert "granularity G          32" in printed and "Krajewski" in printed and "c_r = 14" in printed


def test_refusals_exit_2_with_values_and_fix(results, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("params,tokens,loss\n1e6,1e8,3.0\n")
    assert _run(["fit", str(bad)]) == 2
    assert "missing column(s) granularity" in capsys.readouterr().err
    few = tmp_path / "few.csv"
    few.write_text("params,tokens,granularity,loss\n" + "".join(f"{n},1e9,{g},3.{g}\n" for n in (1e6, 2e6) for g in (1, 2)))
    assert _run(["fit", str(few), "--bootstrap", "0"]) == 2
    assert "4 points cannot fit the 7 free coefficients" in capsys.readouterr().err
    assert _run(["fit", str(few), "--law", "joint2025"]) == 2
    assert "missing column(s) experts" in capsys.readouterr().err
    assert _run(["fit", str(results), "--fix", "alpha"]) == 2
    assert "--fix 'alpha' is not NAME=VALUE; fix: e.g. --fix alpha=0.115" in capsys.readouterr().err
    assert _run(["plan", "--flops", "1e20", "--memory", "8e10"]) == 2
    assert "--memory 8e+10 needs a law that varies the number of experts" in capsys.readouterr().err
    law = tmp_path / "law.json"
    law.write_text(json.dumps({"law": "krajewski2024", "coefficients": {"a": 1.0}}))
    assert _run(["plan", "--flops", "1e20", "--law-json", str(law)]) == 2
    assert "coefficient alpha=None is missing" in capsys.readouterr().err
    assert _run(["plan", "--flops", "1e3"]) == 2
    assert "fix: a budget >=" in capsys.readouterr().err
    assert _run(["plan", "--flops", "1e20", "--granularities", "1,x"]) == 2


def test_fit_and_plan_run_without_megatron_core(results, tmp_path) -> None:
    code = (
        "import sys\n"
        "from megatron_moe_ext import cli\n"
        f"assert cli.main(['fit', {str(results)!r}, '--bootstrap', '0', '--starts', 'small']) == 0\n"
        "assert cli.main(['plan', '--flops', '1e21']) == 0\n"
        "assert not [m for m in sys.modules if m.startswith('megatron.core') or m == 'torch'], 'imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
