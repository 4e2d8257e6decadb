"""``sweep run DIR``: the planned runs, one after the other, resumable.

A run is finished when its command exited 0 and its train.log shows its last iteration and the final validation;
then ``RUN/done.json`` is written (atomically) and later sweeps skip it. Each run's command (``RUN/command.sh``,
``--save ckpt --load ckpt``) runs in its own process group (``runtime/run_group.py``): SIGINT/SIGTERM to
``sweep run`` stop the current run and everything it started, and the sweep ends; rerunning it resumes that run
from its last checkpoint (Megatron loads ``ckpt``'s latest iteration) and goes on with the rest.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from megatron_moe_ext.scaling.atomic_files import write_json_atomic
from megatron_moe_ext.scaling.log_parsing import finished, parse_train_log

DONE = "done.json"


def load_plan(plan_dir: str) -> list[dict[str, Any]]:
    """The rows of ``DIR/runs.json``; ValueError naming the fix when it is not a plan directory."""
    path = os.path.join(plan_dir, "runs.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"{path} does not exist: {plan_dir!r} is not a sweep plan; fix: write one with "
            f"`megatron-moe-ext sweep plan ... --out {plan_dir}`"
        )
    with open(path) as fh:
        return json.load(fh)["runs"]


def is_done(plan_dir: str, row: dict[str, Any]) -> bool:
    return os.path.isfile(os.path.join(plan_dir, row["run"], DONE))


def _one_run(plan_dir: str, row: dict[str, Any], env: dict[str, str]) -> tuple[int, int | None]:
    """Run ``row``'s command.sh in its own process group; (exit code, received signal or None)."""
    from megatron_moe_ext.runtime.run_group import RunGroup, StopSignals

    script = os.path.join(plan_dir, row["run"], "command.sh")
    with StopSignals() as stop, RunGroup(grace_s=30.0) as group:
        proc = subprocess.Popen(["bash", script], env=env, process_group=group.pgid, stdin=subprocess.DEVNULL)
        while stop.signum is None:
            try:
                return proc.wait(timeout=0.5), None
            except subprocess.TimeoutExpired:
                continue
        stop.report(f"run {row['run']} (pid {proc.pid})")
        group.stop()
        try:
            code = proc.wait(timeout=group.grace_s + 5.0)
        except subprocess.TimeoutExpired:  # not expected: the reaper kills the group after grace_s
            proc.kill()
            code = proc.wait()
        return code, stop.signum


def run_sweep(plan_dir: str, *, only: Sequence[str] = ()) -> int:
    """Run every unfinished run of the plan (or those named in ``only``); 0 when all finished, 1 when some
    failed (listed), 128 + signal when stopped by a signal."""
    rows = load_plan(plan_dir)
    names = [r["run"] for r in rows]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ValueError(f"--only {unknown}: no such runs in {plan_dir}; fix: one of {names}")
    env = dict(os.environ)
    env.setdefault("MEGATRON_MOE_EXT", f"{shlex.quote(sys.executable)} -m megatron_moe_ext")
    failures: list[str] = []
    selected = [r for r in rows if not only or r["run"] in only]
    for i, row in enumerate(selected, start=1):
        run_dir = os.path.join(plan_dir, row["run"])
        log_path = os.path.join(run_dir, "train.log")
        if is_done(plan_dir, row):
            print(f"[{i}/{len(selected)}] {row['run']}: finished already (skipped)", flush=True)
            continue
        resume = os.path.isfile(os.path.join(run_dir, "ckpt", "latest_checkpointed_iteration.txt"))
        print(f"[{i}/{len(selected)}] {row['run']}: {row['iterations']} iterations"
              f"{' (resuming from its last checkpoint)' if resume else ''}; log {log_path}", flush=True)
        start = time.monotonic()
        code, signum = _one_run(plan_dir, row, env)
        wall = time.monotonic() - start
        if signum is not None:
            print(f"sweep stopped during {row['run']}; rerun `megatron-moe-ext sweep run {plan_dir}` to resume it "
                  "from its last checkpoint", file=sys.stderr, flush=True)
            return 128 + signum
        why = f"exit code {code}" if code else None
        if why is None:
            with open(log_path, errors="replace") as fh:
                why = finished(parse_train_log(fh.read()), int(row["iterations"]))
        if why is not None:
            failures.append(row["run"])
            print(f"  FAILED {row['run']}: {why}; see {log_path}", file=sys.stderr, flush=True)
            continue
        write_json_atomic(os.path.join(run_dir, DONE), {
            "run": row["run"], "exit_code": code, "iterations": int(row["iterations"]), "wall_s": round(wall, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
        print(f"  done in {wall:.1f} s", flush=True)
    if failures:
        print(f"{len(failures)} run(s) failed: {', '.join(failures)} (logs: {plan_dir}/RUN/train.log); "
              f"fix the cause and rerun `megatron-moe-ext sweep run {plan_dir}` (finished runs are skipped)",
              file=sys.stderr, flush=True)
        return 1
    return 0
