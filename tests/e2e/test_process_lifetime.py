"""No hangs, no leaks: when a rank or the launcher dies, or the launcher is told to stop, every process of the run
ends within seconds: ranks, Megatron's checkpoint workers (``multiprocessing`` spawn) and resource trackers
(runtime/run_group.py). A run killed mid-save resumes from its last complete checkpoint.

Every test kills only processes it started, by pid: the launcher's process tree, collected before the kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import shared_cache

# Every iteration saves, so the run is mid-save or between two saves when killed; the checkpoint writer's
# workers exist from the first save on.
SAVING = ["--train-iters", "60", "--lr-warmup-iters", "1", "--eval-interval", "1000", "--save-interval", "1",
          "--save", "ckpt"]
STOP_S = 15.0  # the reaper's grace period (5 s) plus margin for a loaded 2-core machine


class Run:
    """``megatron-moe-ext train`` in a subprocess, with its merged output collected by a thread."""

    def __init__(self, tmp: Path, *args: str) -> None:
        env = dict(os.environ, MEGATRON_MOE_EXT_CACHE=shared_cache(), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "megatron_moe_ext", "train", *args], cwd=tmp, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, count: int = 1, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(needle in line for line in list(self.lines)) < count:
            assert self.proc.poll() is None, f"the run ended before {needle!r} x{count}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no {needle!r} x{count} in {timeout} s:\n{self.output[-4000:]}"
            time.sleep(0.2)

    def tree(self) -> list[psutil.Process]:
        """The launcher and every process below it, now."""
        launcher = psutil.Process(self.proc.pid)
        return [launcher, *launcher.children(recursive=True)]

    def exit_code(self, timeout: float = STOP_S) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout)
        return code


def command_lines(procs: list[psutil.Process]) -> list[str]:
    lines = []
    for proc in procs:
        try:
            lines.append(" ".join(proc.cmdline()))
        except psutil.Error:
            pass
    return lines


def assert_all_end(procs: list[psutil.Process], timeout: float = STOP_S) -> None:
    """Every process in ``procs`` ends within ``timeout``; survivors are killed (by pid) and fail the test."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    survivors = command_lines(alive)
    for proc in alive:
        proc.kill()
    assert not survivors, f"{len(survivors)} process(es) of the run survived {timeout} s: {survivors}"


@pytest.fixture
def started(tmp_path):
    """Runs started by a test; whatever of them is left at the end is killed, by pid."""
    runs: list[Run] = []
    yield lambda *args: runs.append(Run(tmp_path, *args)) or runs[-1]
    for run in runs:
        try:
            leftovers = run.tree()
        except psutil.NoSuchProcess:
            continue
        for proc in leftovers:
            proc.kill()


def mid_save(run: Run, count: int = 1) -> list[psutil.Process]:
    """Wait until the run is saving checkpoint ``count`` and its checkpoint writer's worker and resource tracker
    are up; return all of its processes."""
    run.wait_for("saving checkpoint", count=count)
    deadline = time.monotonic() + 120
    while True:
        procs = run.tree()
        kinds = "\n".join(command_lines(procs))
        if "resource_tracker" in kinds and "spawn_main" in kinds:
            return procs
        assert time.monotonic() < deadline, f"no checkpoint worker to test:\n{kinds}\n{run.output[-4000:]}"
        time.sleep(0.2)


def test_a_killed_rank_stops_the_run(started) -> None:
    run = started(*SAVING)
    procs = mid_save(run)
    ranks = [p for p in procs if p.ppid() == run.proc.pid and "megatron_moe_ext" in " ".join(p.cmdline())]
    victim = max(ranks, key=lambda p: p.pid)  # rank 1 (the reaper, forked first, has the lowest pid)
    victim.kill()
    start = time.monotonic()
    code = run.exit_code()
    assert code != 0, run.output[-4000:]
    assert time.monotonic() - start < STOP_S
    assert f"(pid {victim.pid}) was killed by SIGKILL" in run.output, run.output[-4000:]
    assert_all_end(procs)


def test_sigterm_to_the_launcher_stops_the_run(started) -> None:
    run = started(*SAVING)
    procs = mid_save(run)
    run.proc.send_signal(signal.SIGTERM)
    assert run.exit_code() == 128 + signal.SIGTERM, run.output[-4000:]
    assert "SIGTERM received; stopping 2 local rank(s)" in run.output
    assert_all_end(procs)


def test_a_killed_launcher_takes_the_run_down_and_the_run_resumes(started, tmp_path) -> None:
    run = started(*SAVING)
    procs = mid_save(run, count=2)  # the first checkpoint is complete
    run.proc.kill()
    assert_all_end(procs)
    run.exit_code()
    assert f"the launcher (pid {run.proc.pid}) is gone; stopping its ranks" in run.output, run.output[-4000:]

    # Megatron writes latest_checkpointed_iteration.txt only after a complete save: resume from it.
    last = int((tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    resumed = started(*SAVING, "--load", "ckpt", "--exit-interval", str(last + 1))  # same schedule, one step
    assert resumed.exit_code(timeout=300) == 0, resumed.output[-4000:]
    assert f"iteration {last + 1:8d}/      60" in resumed.output, resumed.output[-4000:]


# The GPU path: torchrun under ``run_command``. torchrun starts each worker in a new session (out of the run's
# group), so this checks that torchrun, signalled by the reaper, takes its workers and their children down.
_WORKER = """
import multiprocessing, time
if __name__ == "__main__":
    multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,), daemon=True).start()
    print("worker up", flush=True)
    time.sleep(600)
"""
_LAUNCHER = (
    "import sys; from megatron_moe_ext.runtime.run_group import run_command; sys.exit(run_command("
    "[sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=2', sys.argv[1]]))"
)


def test_torchrun_ends_with_a_killed_launcher(tmp_path) -> None:
    """SIGKILL: the case only the reaper can handle (SIGTERM goes through StopSignals, as for local ranks)."""
    (tmp_path / "worker.py").write_text(_WORKER)
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(tmp_path / "worker.py")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        up = 0
        while up < 2:
            line = launcher.stdout.readline()
            assert line, "the launcher ended before both workers were up"
            up += "worker up" in line
        procs = [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
        # launcher, reaper, torchrun, 2 workers, and per worker its spawn child and resource tracker
        assert len(procs) >= 9, command_lines(procs)
        launcher.kill()
        assert_all_end(procs, timeout=40.0)  # torchrun's own shutdown: SIGTERM to its workers, 30 s, SIGKILL
    finally:
        launcher.kill()
        launcher.wait()


def _rank_with_a_worker(argv: list[str]) -> None:
    """A rank that starts a spawn worker (as Megatron's checkpoint writer does), records its pids, then rank 1 dies
    by SIGKILL while rank 0 waits as if in a collective."""
    import multiprocessing

    worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,), daemon=True)
    worker.start()
    Path(f"{argv[0]}.{os.environ['RANK']}").write_text(f"{os.getpid()} {worker.pid}")
    if os.environ["RANK"] == "1":
        while not Path(f"{argv[0]}.0").exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)


def test_local_ranks_end_with_a_killed_rank_workers_included(tmp_path, capsys) -> None:
    """In-process and without Megatron (a few seconds): the mechanism the end-to-end tests above exercise."""
    from megatron_moe_ext.runtime.local_ranks import start_local_ranks

    start = time.monotonic()
    assert start_local_ranks(_rank_with_a_worker, [str(tmp_path / "pids")], nproc=2, threads_per_rank=1) == 1
    assert time.monotonic() - start < 60
    pids = [int(pid) for rank in (0, 1) for pid in (tmp_path / f"pids.{rank}").read_text().split()]
    rank_1 = pids[2]
    assert f"rank 1 (pid {rank_1}) was killed by SIGKILL" in capsys.readouterr().err
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    assert_all_end(procs, timeout=5.0)
