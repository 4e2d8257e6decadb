"""benchmarks/routing_variants.py: its log parsing and table on known lines, its refusals, and one real run of one
variant at a tiny size (losses are never asserted, only that they are read)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "routing_variants.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("routing_variants_bench", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


LOG = """\
[rank1]  [2026-12-07 06:14:16] iteration        1/       2 | consumed samples: 16 | lm loss: 6.000000E+00 | z_loss: 2.0E+00 | active_experts: 2.50 | null_fraction: 0.25 | max_violation: 0.40 | loss scale: 1.0 |
[rank1]  [2026-12-07 06:14:18] iteration        2/       2 | consumed samples: 32 | lm loss: 5.000000E+00 | active_experts: 1.50 | null_fraction: 0.75 | max_violation: 0.20 | loss scale: 1.0 |
[rank1]  validation loss at iteration 2 on validation set | lm loss value: 5.135224E+00 | lm loss PPL: 169.9 | lm loss (batch choice) value: 5.100000E+00 | lm loss (batch choice) PPL: 1.6E+02 |
[rank1]  validation loss at iteration 2 on test set | lm loss value: 9.0E+00 | lm loss PPL: 1.0E+02 |
"""


def test_parse_log_and_table_known_answers(bench) -> None:
    rows, valid = bench.parse_log(LOG)
    assert [r["lm loss"] for r in rows] == [6.0, 5.0]
    assert rows[0]["active_experts"] == 2.5 and rows[1]["null_fraction"] == 0.75 and rows[1]["max_violation"] == 0.2
    assert valid == {"iteration": 2.0, "loss": 5.135224, "batch_choice_loss": 5.1}  # the validation set, not test
    run = {"train_loss": 5.5, "valid_loss": 5.0, "valid_loss_batch_choice": None, "max_violation": 0.3,
           "active_experts": None, "null_fraction": None}
    other = {**run, "train_loss": 6.5, "max_violation": 0.5}
    table = bench.table_rows({"token choice": {1: run, 2: other}}, [1, 2])
    assert table == [["token choice", "1", "5.500", "5.000", "0.300", "2.00", "-"],
                     ["token choice", "2", "6.500", "5.000", "0.500", "2.00", "-"],
                     ["token choice", "mean", "6.000", "5.000", "0.400", "2.00", "-"]]


@pytest.mark.parametrize(("argv", "message"), [
    (["--variants", "sinkhorn"], "fix: variants from token choice"),
    (["--seeds", "a,b"], "fix: e.g. --seeds 1234,42"),
    (["--iters", "0"], "--iters 0 and --last 20 must be >= 1"),
])
def test_bad_arguments_exit_2(bench, argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_one_tiny_run_end_to_end(tmp_path: Path) -> None:
    from conftest import shared_cache

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "MEGATRON_MOE_EXT_CACHE": shared_cache()}
    out = tmp_path / "results.json"
    md = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--iters", "2", "--seeds", "7", "--variants", "null experts", "--last", "2",
         "--workdir", str(tmp_path / "runs"), "--json", str(out), "--markdown", str(md)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())["results"]["null experts"]["7"]
    assert result["train_loss"] > 0 and result["valid_loss"] > 0
    assert 0 <= result["null_fraction"] <= 1 and 0 <= result["active_experts"] <= 4
    assert "| null experts | mean |" in md.read_text()
