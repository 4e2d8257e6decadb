"""`sweep plan` grid and accounting, refusals, plan files; log parsing; `sweep run`/`collect` control flow.

Training itself is covered by tests/e2e/test_sweep.py; here runs are shell scripts standing in for a run's
command (exit codes, a log with Megatron's lines), so the control flow is tested in milliseconds.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys

import pytest

from megatron_moe_ext.scaling import sweep_cli
from megatron_moe_ext.scaling.log_parsing import finished, parse_train_log
from megatron_moe_ext.scaling.sweep_collect import RESULT_COLUMNS, collect
from megatron_moe_ext.scaling.sweep_plan import SweepSpec, plan_runs
from megatron_moe_ext.scaling.sweep_run import run_sweep
from megatron_moe_ext.training.train import _without

SPEC = SweepSpec(budgets=(1e12, 3e12), hidden_sizes=(48, 64), granularities=(1, 2, 4), expansion_rates=(4, 8),
                 seeds=(1, 2))


def test_grid_rows_and_compute_matching():
    runs = plan_runs(SPEC)
    # per (budget, h, seed): 2 E x 3 G MoE runs + 1 equal-compute dense + 2 equal-params dense (one per E)
    assert len(runs) == 2 * 2 * 2 * (6 + 1 + 2)
    assert len({r.run for r in runs}) == len(runs)
    tokens_per_iter = SPEC.global_batch_size * SPEC.seq_length
    for r in runs:
        assert r.tokens == r.iterations * tokens_per_iter
        assert r.flops == r.training_flops_per_token * r.tokens
        # rounded to whole iterations: within half an iteration's FLOPs of the budget
        assert abs(r.flops - r.budget_flops) <= 0.5 * r.training_flops_per_token * tokens_per_iter
        assert f"--train-iters {r.iterations} --eval-interval {r.iterations} " in r.row()["command"]
    by = {r.run: r for r in runs}
    h, L, d_ff = 64, SPEC.num_layers, SPEC.ffn_hidden_size
    g1, g4 = by["b1e12_h64_G1_E8_s1"], by["b1e12_h64_G4_E8_s1"]
    assert (g4.experts, g4.topk, g4.expert_size) == (32, 8, 64)
    # G changes only the router: E*G*h parameters and 2*h*E*G forward FLOPs per MoE layer (no bias)
    assert g4.params - g1.params == L * h * (32 - 8)
    assert g4.total_params - g1.total_params == L * h * (32 - 8)
    assert g4.training_flops_per_token - g1.training_flops_per_token == 3 * L * 2 * h * (32 - 8)
    dense_c, dense_p = by["b1e12_h64_dense-compute_s1"], by["b1e12_h64_dense-params-E8_s1"]
    assert dense_c.ffn_hidden_size == 2 * d_ff and dense_p.ffn_hidden_size == 8 * d_ff
    assert dense_c.training_flops_per_token == g1.training_flops_per_token - 3 * g1.router_flops_per_token  # forward router x 3
    assert dense_p.total_params == g1.total_params - L * h * 8  # the MoE's total less its router
    assert dense_p.iterations < g1.iterations
    assert "--moe-layer-freq '([0]*2)' " in dense_c.row()["command"]


def _model_flags(command: str) -> list[str]:
    args = shlex.split(command)[2:]
    drop = {"--nproc", "--train-iters", "--eval-interval", "--eval-iters", "--save-interval", "--save", "--load",
            "--ext-loss-log", "--seed"}
    return _without(args, drop)


def test_accounting_is_that_of_the_command():
    """The planned numbers equal `megatron-moe-ext flops` (Megatron's own parser) on the command's flags."""
    runs = {r.run: r for r in plan_runs(SPEC)}
    names = ("b1e12_h48_G2_E4_s1", "b1e12_h48_dense-params-E4_s1")
    argvs = [[*_model_flags(runs[n].row()["command"]), "--vocab-size", str(SPEC.vocab_size), "--json"] for n in names]
    script = ("import sys, json\nfrom megatron_moe_ext.accounting_cli import main\n"
              f"for argv in json.loads({json.dumps(json.dumps(argvs))}):\n    main(argv)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    decoder, text, found = json.JSONDecoder(), proc.stdout.strip(), []
    while text:
        obj, end = decoder.raw_decode(text)
        found.append(obj)
        text = text[end:].strip()
    for name, acc in zip(names, found, strict=True):
        run = runs[name]
        assert acc["training_flops_per_token"] == run.training_flops_per_token
        assert acc["active_params"] - acc["embedding_params"] == run.params
        assert acc["total_params"] - acc["embedding_params"] == run.total_params


def _plan(tmp_path, *extra: str, out: str | None = None) -> int:
    return sweep_cli.main(["plan", "--flops", "1e12", "--granularity", "1,2", "--expansion-rate", "4",
                           "--hidden-size", "64", "--out", out or str(tmp_path / "plan"), *extra])


@pytest.mark.parametrize(("flags", "needles"), [
    (["--granularity", "3"], ["G=3 does not divide ffn_hidden_size=256", "fix: use G in [1, 2, 4, 8, 16"]),
    (["--flops", "1e9"], ["4 run(s) get less than 1 iteration", "b1e9_h64_G1_E4_s1234 (0.3 iterations)",
                          "fix: budgets of at least 5.738e+09 FLOPs (one iteration of the costliest run)"]),
    (["--max-iters", "100"], ["4 run(s) need more than --max-iters 100", "b1e12_h64_G1_E4_s1234 (300 iterations)",
                              "budgets of at most 3.322e+11 FLOPs"]),
    (["--flops", "1e12,1.00001e12"], ["name the same runs (['1e12', '1e12']", "fix: budgets that differ"]),
    (["--hidden-size", "66"], ["hidden size 66 is not divisible by num_attention_heads=4", "fix:"]),
    (["--expansion-rate", "1", "--base-topk", "2"], ["exceeds the number of experts", "fix:"]),
    (["--global-batch-size", "12"], ["global_batch_size=12", "multiple of 16"]),
    (["--", "--hidden-size", "32"], ["extra train flags ['--hidden-size'] are set by the planner", "fix:"]),
    (["--", "--vocab-size", "1000"], ["--vocab-size 1000 differs from the planner's --vocab-size 257",
                                      "fix: pass --vocab-size 1000 to `sweep plan`"]),
])
def test_bad_input_is_refused_before_writing(tmp_path, capsys, flags, needles):
    i = flags.index("--") if "--" in flags else len(flags)
    with pytest.raises(SystemExit) as exc:
        sweep_cli.main(["plan", "--flops", "1e12", "--granularity", "1,2", "--expansion-rate", "4",
                        "--hidden-size", "64", "--out", str(tmp_path / "plan"), *flags[:i], *flags[i:]])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err
    assert not (tmp_path / "plan").exists()


def test_plan_files_and_existing_directory(tmp_path, capsys):
    assert _plan(tmp_path) == 0
    plan = tmp_path / "plan"
    rows = json.loads((plan / "runs.json").read_text())["runs"]
    with open(plan / "runs.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == [r["run"] for r in csv_rows] == [
        "b1e12_h64_G1_E4_s1234", "b1e12_h64_G2_E4_s1234", "b1e12_h64_dense-compute_s1234",
        "b1e12_h64_dense-params-E4_s1234"]
    assert csv_rows[1]["command"] == rows[1]["command"]
    script = plan / rows[1]["run"] / "command.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "--save ckpt --load ckpt --ext-loss-log loss.jsonl" in text and ">> train.log 2>&1" in text
    sbatch = (plan / rows[1]["run"] / "slurm.sbatch").read_text()
    assert "#SBATCH --job-name=b1e12_h64_G2_E4_s1234" in sbatch and "--nproc 2" not in sbatch
    assert "b1e12_h64_G2_E4_s1234" in capsys.readouterr().out
    assert _plan(tmp_path) == 0  # the same plan again: nothing written
    assert "already holds this plan" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _plan(tmp_path, "--seeds", "7")
    assert "is not empty" in capsys.readouterr().err
    assert _plan(tmp_path, "--seeds", "7", "--force", "--", "--lr", "1e-3", "--vocab-size", "257") == 0
    assert (plan / "b1e12_h64_G1_E4_s7").is_dir() and not (plan / "b1e12_h64_G1_E4_s1234").exists()
    command = json.loads((plan / "runs.json").read_text())["runs"][0]["command"]
    assert command.endswith("--log-interval 1 --seed 7 --lr 1e-3 --vocab-size 257")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left


# Lines as a real `megatron-moe-ext train --train-iters 6 --eval-interval 6` log prints them (abridged columns).
LOG = """\
[rank1]  [2026-12-07 02:56:53.195378] iteration        1/       3 | consumed samples:           16 | lm loss: 5.992328E+00 | load_balancing_loss: 1.014804E+00 |
[rank0] Number of parameters in most loaded shard in billions: 0.0003
[rank1]  [2026-12-07 02:56:53.333931] iteration        2/       3 | consumed samples:           32 | lm loss: 5.986078E+00 |
[rank1]  [2026-12-07 02:56:53.461721] iteration        3/       3 | consumed samples:           48 | lm loss: 5.559727E+00 |
[rank1]  validation loss at iteration 3 | lm loss value: 4.812272E+00 | lm loss PPL: 1.230108E+02 |
[rank1]  validation loss at iteration 3 on validation set | lm loss value: 4.822664E+00 | lm loss PPL: 1.242958E+02 |
[rank1]  validation loss at iteration 3 on test set | lm loss value: 4.683903E+00 | lm loss PPL: 1.081915E+02 |
"""


def test_log_parsing_known_answer():
    log = parse_train_log("[rank0]   successfully loaded checkpoint from ckpt [ t 1/1, gtp_remat 1/1, p 1/1 ] "
                          "at iteration 2\n" + LOG)
    assert log.train_loss == {1: 5.992328, 2: 5.986078, 3: 5.559727}
    assert log.validation == [(3, 4.812272, False), (3, 4.822664, True)]  # the test set is left out
    assert log.loaded_iterations == [2] and log.train_iters == 3
    assert finished(log, 3) is None
    assert "last training iteration is 2 of 3" in finished(parse_train_log(LOG.splitlines()[0] + "\n" + LOG.splitlines()[2]), 3)
    assert "no final validation" in finished(parse_train_log("\n".join(LOG.splitlines()[:5])), 3)


def _fake(plan, run: str, body: str) -> None:
    (plan / run / "command.sh").write_text(f"#!/usr/bin/env bash\ncd \"$(dirname \"$0\")\"\n{body}\n")


def test_run_and_collect_control_flow(tmp_path, capsys):
    """Stand-in commands: a failure is reported and the sweep goes on; finished runs are skipped; collect
    refuses unfinished runs unless --partial and computes the contract's columns."""
    sweep_cli.main(["plan", "--flops", "1e10", "--granularity", "1,2", "--expansion-rate", "4", "--hidden-size",
                    "64", "--no-dense", "--out", str(tmp_path / "plan")])
    plan = tmp_path / "plan"
    runs = [r["run"] for r in json.loads((plan / "runs.json").read_text())["runs"]]
    assert [json.loads((plan / "runs.json").read_text())["runs"][i]["iterations"] for i in (0, 1)] == [3, 3]
    _fake(plan, runs[0], f"cat > train.log <<'EOF'\n{LOG}EOF")
    _fake(plan, runs[1], "echo broken >> train.log; exit 3")
    assert run_sweep(str(plan)) == 1
    out = capsys.readouterr()
    assert f"FAILED {runs[1]}: exit code 3" in out.err and "1 run(s) failed" in out.err
    assert json.loads((plan / runs[0] / "done.json").read_text())["iterations"] == 3
    with pytest.raises(ValueError, match=f"1 of 2 runs are not finished: {runs[1]}; fix: `megatron-moe-ext sweep run"):
        collect(str(plan))
    path, left = collect(str(plan), partial=True)
    assert left == [runs[1]]
    with open(path) as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == RESULT_COLUMNS
        (row,) = list(reader)
    assert float(row["loss"]) == 4.822664 and float(row["best_loss"]) == 4.812272
    assert float(row["final_train_loss"]) == pytest.approx((5.992328 + 5.986078 + 5.559727) / 3)
    assert row["granularity"] == "1" and row["experts"] == "4" and row["iterations"] == "3"
    _fake(plan, runs[1], "exit 0")  # exit 0 without the final iteration in its log: not finished
    assert run_sweep(str(plan)) == 1
    out = capsys.readouterr()
    assert f"{runs[0]}: finished already (skipped)" in out.out
    assert "last training iteration is 0 of 3" in out.err
    with pytest.raises(ValueError, match="--only \\['nope'\\]: no such runs"):
        run_sweep(str(plan), only=["nope"])
