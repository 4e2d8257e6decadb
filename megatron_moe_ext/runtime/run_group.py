"""Process lifetime of one run: its ranks and everything they start end together, and with the launcher.

A run is more processes than its ranks: with ``--save`` Megatron's checkpoint writer starts worker processes
(``multiprocessing`` spawn, ~600 MB each), and each rank that uses ``multiprocessing`` gets a resource tracker.
A worker waits on its queue forever, so a rank killed mid-run (OOM killer, ``kill -9``) used to leave its
workers and their trackers alive for good (measured: 2 workers and 2 trackers after one rank was SIGKILLed).

``RunGroup`` puts the whole run in one new process group, led by a small *reaper* forked from the launcher:

* ranks join the group (forked ranks call ``join_in_child``, the launcher ``adopt``\\s them as well so there is
  no race; torchrun joins it through ``Popen(process_group=...)``), and whatever they start inherits it:
  measured, Megatron's spawn workers and Python's resource trackers keep their parent's process group;
* the reaper holds the read end of a pipe whose only write end stays in the launcher, so it wakes up when the
  launcher closes it, exits, or is SIGKILLed (the kernel closes it) — no polling, no cooperation from ranks;
* it then empties the group: SIGTERM, a grace period, SIGKILL. It ignores SIGTERM/SIGINT itself, as resource
  trackers do; trackers exit on their own once their ranks and workers are gone, and clean up after them.

The launcher itself stays in its own group and session, so a launcher running inside pytest or a notebook is
untouched, and Ctrl-C at a terminal reaches only the launcher, which stops the run (``StopSignals``). As with
torchrun (whose workers each get a new session), ranks are not in the terminal's foreground group: a rank that
reads the terminal (``breakpoint()``) is stopped by SIGTTIN, as a torchrun worker is.
torchrun's workers are outside the group: the reaper's SIGTERM reaches torchrun, which stops its workers' sessions
itself (``run_command`` gives it 30 s before SIGKILL; measured: 2 workers with spawn children end within 3 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

__all__ = ["RunGroup", "StopSignals", "run_command"]

# What the launcher writes before closing its end of the pipe; end of file without either means it died.
_STOP_NOW = b"k"  # stop the group without waiting for it to end by itself
_DONE = b"d"  # the ranks ended: give trackers and workers _SETTLE_S to exit, then stop what is left
_SETTLE_S = 2.0  # after a normal end: how long trackers and workers get to exit on their own


def _members(pgid: int) -> list[int] | None:
    """Live processes of group ``pgid`` other than this one (zombies excluded); None where /proc is missing."""
    if not os.path.isdir("/proc"):
        return None
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            found.append(int(name))
    return found


def _wait_empty(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while True:
        members = _members(pgid)
        if members == []:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _reaper(read_fd: int, launcher_pid: int, grace_s: float) -> None:
    """Body of the reaper (a forked child that never returns): wait for the launcher, then empty the group."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pgid = os.getpid()
    data = b""
    while True:
        try:
            chunk = os.read(read_fd, 16)
        except InterruptedError:
            continue
        if not chunk:
            break
        data += chunk
    if not data:  # (not os.getppid(): the kernel closes a dead process's files before it reparents children)
        print(f"megatron-moe-ext: the launcher (pid {launcher_pid}) is gone; stopping its ranks", file=sys.stderr,
              flush=True)
    elif _STOP_NOW not in data and _wait_empty(pgid, _SETTLE_S):
        return
    os.killpg(pgid, signal.SIGTERM)
    os.killpg(pgid, signal.SIGCONT)  # a stopped process (e.g. a rank that read the terminal: SIGTTIN) gets it too
    if not _wait_empty(pgid, grace_s):
        os.killpg(pgid, signal.SIGKILL)  # this process included


class RunGroup:
    """A new process group for one run, emptied when the launcher closes it or dies (see the module docstring).

    Use as a context manager around starting and joining the ranks; ``stop()`` ends the run now (SIGTERM to every
    process of the group, SIGKILL after ``grace_s``), leaving the context waits for the group to empty by itself
    first. Either way the context returns only once the group is empty (or the reaper gave up, bounded).
    """

    def __init__(self, *, grace_s: float = 5.0) -> None:
        self.grace_s = grace_s
        self.pgid = -1
        self._read_fd = self._write_fd = -1

    def __enter__(self) -> RunGroup:
        self._read_fd, self._write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        launcher = os.getpid()
        pid = os.fork()
        if pid == 0:  # the reaper: must never return into the caller's code
            code = 0
            try:
                os.setpgid(0, 0)
                os.close(self._write_fd)
                _reaper(self._read_fd, launcher, self.grace_s)
            except BaseException:  # noqa: BLE001 - a reaper has nobody to report to but stderr
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        try:
            os.setpgid(pid, pid)  # also here: the group must exist before a rank joins it
        except (PermissionError, ProcessLookupError):
            pass
        os.close(self._read_fd)
        self.pgid = pid
        return self

    def adopt(self, pid: int) -> None:
        """Move the launcher's child ``pid`` into the group (it may have done so itself already)."""
        try:
            os.setpgid(pid, self.pgid)
        except (PermissionError, ProcessLookupError):  # already exited, or exec'd and moved itself
            pass

    def join_in_child(self) -> None:
        """In a child forked by the launcher: join the group and drop the launcher's end of the pipe, whose
        copy here would otherwise keep the reaper from noticing the launcher's death."""
        os.close(self._write_fd)
        try:
            os.setpgid(0, self.pgid)
        except PermissionError:  # the reaper is gone already: the launcher is stopping the run
            pass

    def stop(self) -> None:
        """End the run now: SIGTERM to the whole group, SIGKILL after the grace period."""
        self._close_pipe(_STOP_NOW)

    def _close_pipe(self, word: bytes) -> None:
        if self._write_fd >= 0:
            try:
                os.write(self._write_fd, word)
            except OSError:  # the reaper is gone
                pass
            os.close(self._write_fd)
            self._write_fd = -1

    def __exit__(self, *exc: object) -> None:
        self._close_pipe(_DONE if exc[0] is None else _STOP_NOW)
        deadline = time.monotonic() + _SETTLE_S + self.grace_s + 5.0
        try:
            while not os.waitpid(self.pgid, os.WNOHANG)[0]:
                if time.monotonic() > deadline:  # not expected: the reaper's own waits are bounded
                    print(f"megatron-moe-ext: the run's process group {self.pgid} did not end; killing it",
                          file=sys.stderr)
                    os.killpg(self.pgid, signal.SIGKILL)
                    os.waitpid(self.pgid, 0)
                    return
                time.sleep(0.05)
        except (ChildProcessError, ProcessLookupError):  # reaped elsewhere (SIGCHLD ignored) or already gone
            pass


class StopSignals:
    """Turn SIGINT/SIGTERM to the launcher into a flag (``signum``) that its wait loop checks, so the launcher
    stops its run instead of dying and leaving it. Handlers are installed only in the main thread and restored
    on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back; also what a child forked inside the context must do first, or it
        would inherit handlers that only set a flag, and ignore SIGTERM from the reaper until SIGKILL."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def report(self, what: str) -> int:
        """Print that the run stops because of the received signal; return the shell's code for it."""
        assert self.signum is not None, "report() called without a received signal"
        print(f"megatron-moe-ext: {signal.Signals(self.signum).name} received; stopping {what}", file=sys.stderr,
              flush=True)
        return 128 + self.signum


def run_command(command: Sequence[str], *, env: dict[str, str] | None = None, grace_s: float = 30.0) -> int:
    """``subprocess.call(command)`` for a launcher such as torchrun, in its own ``RunGroup``: SIGINT/SIGTERM to
    this process stop it (torchrun forwards them to its workers and has ``grace_s`` to finish), and a dead
    caller takes it down. Returns its exit code, or 128 + the signal number when a signal stopped it."""
    with StopSignals() as stop, RunGroup(grace_s=grace_s) as group:
        proc = subprocess.Popen(list(command), env=env, process_group=group.pgid)
        while stop.signum is None:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
        code = stop.report(f"{command[0]} (pid {proc.pid})")
        group.stop()
        try:
            proc.wait(timeout=group.grace_s + 5.0)
        except subprocess.TimeoutExpired:  # not expected: the reaper kills the group after grace_s
            proc.kill()
            proc.wait()
        return code
