"""Start N ranks on this CPU machine as forked children of an already-imported launcher.

torchrun starts every rank as a fresh interpreter, and each one imports torch and megatron-core again:
about 10 s of CPU per rank on our 2-core machines, before any work. On CPU, where all ranks are local and
gloo is the backend, the launcher has already imported megatron (to validate the flags), so ranks forked
from it start with those modules in memory. Each child gets the environment torchrun would give it
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). If one
rank fails, the run's whole process group is stopped (the other ranks, their checkpoint workers and resource
trackers: ``runtime/run_group.py``) and the launcher returns non-zero with the failing rank's traceback, as
torchrun does.

Why fork is safe here: the launcher has only imported modules and parsed flags. It must not have run a
multi-threaded torch op before forking: a child that enters an OpenMP region its parent already used
deadlocks (measured with torch 2.14's libgomp). ``start_local_ranks`` is therefore called before any
tensor work. GPU runs keep torchrun (CUDA cannot be forked after initialisation, and GPU jobs usually come
from a cluster launcher anyway).
"""

from __future__ import annotations

import os
import random
import socket
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing import process as mp_process

from megatron_moe_ext.runtime.rank_output import PrefixedOutput
from megatron_moe_ext.runtime.run_group import RunGroup, StopSignals

__all__ = ["free_port", "rank_environment", "start_local_ranks"]


def _os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: no way to tell, assume nothing started
        return 0


# Launchers import this module after their imports and before any tensor work. A thread started since
# then is most likely torch's intra-op pool (its first parallel op starts it); see start_local_ranks.
_THREADS_AT_IMPORT = _os_threads()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, chosen below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` lies in the ephemeral range, the same range every outgoing
    connection (gloo's pairs, other jobs' stores) takes its local port from: between our check and the
    store's ``listen`` one of those can take it (EADDRINUSE, seen on CI with two test workers). Ports below
    the range are only taken by servers that ask for them by number, so a random one that binds now very
    likely still binds a moment later.
    """
    low, _ = _ephemeral_range()
    lowest = 20000 if low > 21000 else 1024
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(64):
        port = rng.randrange(lowest, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The torchrun-style variables one local rank of a single-machine job sees."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
    }


def _rank(rank: int, world_size: int, port: int, threads: int, entry: Callable[[list[str]], object],
          argv: list[str], group: RunGroup, stop: StopSignals) -> None:
    stop.restore()
    group.join_in_child()
    os.environ.update(rank_environment(rank, world_size, port))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # Several ranks share this terminal: whole lines, each prefixed with its rank (runtime/rank_output.py).
    output = PrefixedOutput(rank).start() if world_size > 1 else None
    try:
        import torch

        torch.set_num_threads(threads)
        entry(argv)
    finally:
        if output is not None:
            output.close()


def start_local_ranks(entry: Callable[[list[str]], object], argv: Sequence[str], nproc: int,
                      threads_per_rank: int | None = None, preload: Sequence[str] = ()) -> int:
    """Run ``entry(argv)`` on ``nproc`` forked local ranks; return 0, or the failing rank's exit code (1 for
    an exception, whose traceback goes to stderr; 128 + N when signal N stopped this process). ``entry`` must
    be a module-level function; ``preload`` names the modules it imports, imported here once so every rank
    starts with them (imports only: no tensor work happens before the fork). Whatever ends the run (a rank's
    failure, SIGINT/SIGTERM here, this process dying) ends all of its processes (runtime/run_group.py)."""
    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be >= 1")
    import importlib

    import torch.multiprocessing as mp

    for name in preload:
        importlib.import_module(name)

    threads = threads_per_rank or int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // nproc))
    if threads > 1 and _os_threads() > _THREADS_AT_IMPORT:
        # This process may have used its OpenMP pool already (e.g. an in-process call after tensor work): a
        # forked child that uses it again hangs, one with a single intra-op thread never enters it.
        print(f"megatron-moe-ext: threads were started in this process before forking {nproc} ranks; each rank "
              f"runs with 1 intra-op thread instead of {threads} (start from the command line for {threads})",
              file=sys.stderr)
        threads = 1
    # Buffered output would otherwise be written once by the launcher and once more by every child.
    sys.stdout.flush()
    sys.stderr.flush()
    # The ranks and all they start (checkpoint workers, resource trackers) form one process group that ends as a
    # whole: when a rank fails, when this process is signalled, and when it dies (runtime/run_group.py).
    with StopSignals() as stop, RunGroup(grace_s=_GRACE_S) as group:
        context = mp.start_processes(_rank, args=(nproc, free_port(), threads, entry, list(argv), group, stop),
                                     nprocs=nproc, join=False, start_method="fork")
        for process in context.processes:
            group.adopt(process.pid)
        failed = _wait_for_ranks(context.processes, stop)
        signalled = stop.report(f"{nproc} local rank(s)") if stop.signum is not None else None
        if failed is not None or signalled is not None:
            group.stop()
        for process in context.processes:  # after stop(): bounded by the grace period
            process.join(_GRACE_S + 5.0)
    if signalled is not None:
        return signalled
    return 0 if failed is None else _report_failure(failed, context.processes[failed], context.error_files[failed])


_GRACE_S = 5.0  # after SIGTERM, before SIGKILL: ranks stopped by us hold nothing worth waiting longer for


def _wait_for_ranks(processes: Sequence[mp_process.BaseProcess], stop: StopSignals) -> int | None:
    """Wait until every rank ended (None), one failed (its index), or a stop signal came (None)."""
    from multiprocessing.connection import wait

    while stop.signum is None:
        running = [p for p in processes if p.exitcode is None]
        failed = [i for i, p in enumerate(processes) if p.exitcode not in (None, 0)]
        if failed:
            return failed[0]
        if not running:
            return None
        wait([p.sentinel for p in running], timeout=0.5)
    return None


def _report_failure(index: int, process: mp_process.BaseProcess, error_file: str) -> int:
    """One line naming the failed rank and why (with its traceback, if it raised); return its exit code."""
    import pickle
    import signal

    if os.access(error_file, os.R_OK):  # torch's wrapper pickled the traceback there
        with open(error_file, "rb") as fh:
            print(f"rank {index} failed:\n{pickle.load(fh)}", file=sys.stderr)
        return 1
    code = process.exitcode
    if code is not None and code < 0:
        print(f"rank {index} (pid {process.pid}) was killed by {signal.Signals(-code).name}; stopped the other "
              "ranks and their workers", file=sys.stderr)
        return 1
    print(f"rank {index} (pid {process.pid}) exited with code {code}", file=sys.stderr)
    return code or 1
