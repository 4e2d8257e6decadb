"""`megatron-moe-ext sweep plan | run | collect` end to end with real 2-rank CPU training.

1. A 2x2 grid (G in {1, 2} plus the equal-compute and equal-parameter dense baselines) of 2-3-iteration runs:
   plan, run, collect; the results table has the contract's columns and the losses the logs show.
2. A killed sweep resumes: `sweep run` is SIGTERMed once its (30-iteration) run has saved a checkpoint;
   nothing of the run is left running; a second `sweep run` resumes that run from the checkpoint (the log says
   it loaded it) and finishes it, and `collect` works. (Going on with the other runs after a finished one is
   test 1's second `sweep run`.)
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_moe_ext.scaling.log_parsing import parse_train_log
from megatron_moe_ext.scaling.sweep_collect import RESULT_COLUMNS

SWEEP = [sys.executable, "-m", "megatron_moe_ext", "sweep"]


def _sweep(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*SWEEP, *args], capture_output=True, text=True, timeout=timeout)


def _processes_in(path: str) -> list[int]:
    """Live processes whose working directory is under ``path`` (a run's ranks, workers, trackers)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            with open(f"/proc/{name}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cwd.startswith(path) and state not in "ZX":
            found.append(int(name))
    return found


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    plan = str(tmp_path_factory.mktemp("sweep") / "plan")
    proc = _sweep("plan", "--flops", "1e10", "--granularity", "1,2", "--expansion-rate", "4",
                  "--hidden-size", "64", "--out", plan)
    assert proc.returncode == 0, proc.stderr
    ran = _sweep("run", plan, timeout=400)
    return plan, ran


def test_grid_plan_run_collect(grid):
    plan, ran = grid
    assert ran.returncode == 0, ran.stdout + ran.stderr
    rows = json.loads(open(os.path.join(plan, "runs.json")).read())["runs"]
    assert [(r["kind"], r["iterations"]) for r in rows] == [
        ("moe", 3), ("moe", 3), ("dense_equal_compute", 3), ("dense_equal_params", 2)]
    for row in rows:
        done = json.loads(open(os.path.join(plan, row["run"], "done.json")).read())
        assert done["exit_code"] == 0 and done["iterations"] == row["iterations"]
        assert os.path.isfile(os.path.join(plan, row["run"], "ckpt", "latest_checkpointed_iteration.txt"))
        assert os.path.isfile(os.path.join(plan, row["run"], "loss.jsonl.rank0"))
    again = _sweep("run", plan)  # everything finished: skipped, no training
    assert again.returncode == 0 and again.stdout.count("finished already (skipped)") == 4, again.stdout
    collected = _sweep("collect", plan)
    assert collected.returncode == 0, collected.stderr
    with open(os.path.join(plan, "results.csv")) as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == RESULT_COLUMNS
        results = {r["run"]: r for r in reader}
    assert list(results) == [r["run"] for r in rows]
    for row in rows:
        res = results[row["run"]]
        log = parse_train_log(open(os.path.join(plan, row["run"], "train.log")).read())
        finals = [loss for _, loss, final in log.validation if final]
        assert float(res["loss"]) == finals[-1]
        assert float(res["best_loss"]) == min(loss for _, loss, _ in log.validation)
        n = row["iterations"]
        assert float(res["final_train_loss"]) == pytest.approx(sum(log.train_loss[i] for i in range(1, n + 1)) / n)
        assert int(res["tokens"]) == row["tokens"] and int(res["flops"]) == row["flops"]
        assert (res["granularity"] == "") == (row["kind"] != "moe")
        assert 0 < float(res["loss"]) < 7  # byte-level cross entropy: ln(257) = 5.55 at chance


def test_killed_sweep_resumes(tmp_path):
    plan = str(tmp_path / "plan")
    proc = _sweep("plan", "--flops", "1e11", "--granularity", "4", "--expansion-rate", "4",
                  "--hidden-size", "64", "--no-dense", "--save-interval", "10", "--out", plan)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(open(os.path.join(plan, "runs.json")).read())["runs"]
    assert [r["iterations"] for r in rows] == [30]
    first = os.path.join(plan, rows[0]["run"])
    latest = os.path.join(first, "ckpt", "latest_checkpointed_iteration.txt")
    sweep = subprocess.Popen([*SWEEP, "run", plan], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not os.path.isfile(latest):
        assert sweep.poll() is None, sweep.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 180 s"
        time.sleep(0.2)
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=90)
    assert sweep.returncode == 128 + signal.SIGTERM, out + err
    assert "SIGTERM received" in err and "to resume it" in err
    time.sleep(1.0)
    assert _processes_in(plan) == [], "processes of the killed run are left"
    assert not os.path.exists(os.path.join(first, "done.json"))
    saved = int(open(latest).read().strip())
    assert saved in (10, 20)
    unfinished = _sweep("collect", plan)
    assert unfinished.returncode == 2 and "1 of 1 runs are not finished" in unfinished.stderr
    resumed = _sweep("run", plan, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "(resuming from its last checkpoint)" in resumed.stdout
    log = parse_train_log(open(os.path.join(first, "train.log")).read())
    assert log.loaded_iterations == [saved]
    assert min(log.train_loss) == 1 and max(log.train_loss) == 30
    collected = _sweep("collect", plan)
    assert collected.returncode == 0, collected.stderr
    with open(os.path.join(plan, "results.csv")) as fh:
        assert [r["iterations"] for r in csv.DictReader(fh)] == ["30"]
