"""Run a function on N gloo ranks, each a fresh process with megatron-core on the CPU runtime.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes, gives them a free TCP port on
127.0.0.1, enables the CPU runtime, initialises the default gloo group and calls ``fn(*args, **kwargs)`` on
every rank. It returns the ranks' return values in rank order. If any rank raises, or the group exceeds
``timeout_s``, it raises ``DistributedTestError`` carrying every failing rank's traceback, so pytest shows
where the failure happened rather than a hang or a bare exit code.

Ranks come from a ``forkserver`` whose server process imports torch and megatron-core once (``PRELOAD``):
every later rank is forked from that clean, already-imported server instead of importing them again (about
10 s of CPU per rank on our CI machines). Not plain fork from the caller: a pytest process has run
multi-threaded torch ops, and a forked child that enters an OpenMP region its parent used deadlocks; it may
also hold process groups or Megatron globals. The server never runs a tensor op. The caller's environment
and working directory are passed to each rank, as spawn would give them.

``fn`` must be importable by name (a module-level function); return values travel back with
``torch.save``, so tensors, dicts and numbers are fine.
"""

from __future__ import annotations

import io
import os
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from megatron_moe_ext.runtime.local_ranks import free_port, rank_environment

__all__ = ["DistributedTestError", "free_port", "run_distributed"]


class DistributedTestError(AssertionError):
    """A distributed test body failed on at least one rank (message holds the tracebacks)."""


# Imported once by the forkserver process (a module that fails to import is skipped by multiprocessing).
PRELOAD: tuple[str, ...] = (
    "torch",
    "torch.distributed",
    "megatron.core",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.dist_checkpointing",
    "megatron.core.optimizer",
    "megatron.training.arguments",
    "megatron_moe_ext.runtime",
    "megatron_moe_ext.specs",
)


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # takes effect when this process's server starts (first use)
    return ctx


def _worker(rank: int, world_size: int, port: int, env: dict[str, str], fn: Callable, args: tuple, kwargs: dict,
            queue) -> None:
    # The forkserver's environment dates from its start; the caller's current one is what spawn would give.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(rank_environment(rank, world_size, port))
    # Two cores on CI: more intra-op threads per rank than cores only adds contention.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        from megatron_moe_ext.runtime import enable_cpu_runtime, init_gloo_from_env

        enable_cpu_runtime()
        init_gloo_from_env()
        from megatron_moe_ext.integration import install

        install(("model",))  # what every entry's rank installs for the model itself (runtime/rank.py)
        result = fn(*args, **kwargs)
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        _teardown()


def _teardown() -> None:
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001 - best effort; the process is about to exit
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


def _run_once(fn: Callable[..., Any], world_size: int, port: int, args: tuple, kwargs: dict,
              timeout_s: float) -> tuple[dict[int, Any], dict[int, str]]:
    ctx = _context()
    queue = ctx.Queue()
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, env, fn, args, kwargs, queue), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except Exception:  # queue.Empty: check for ranks that died without reporting
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in errors]
                for r in dead:
                    if r not in results:
                        errors[r] = f"rank {r} exited with code {procs[r].exitcode} before reporting"
                if errors:
                    # Peers of a dead rank block in collectives until the timeout: stop waiting.
                    break
                continue
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
                # One failing rank usually leaves the others blocked in a collective.
                grace = time.monotonic() + 5.0
                while len(results) + len(errors) < world_size and time.monotonic() < grace:
                    try:
                        r, s, p = queue.get(timeout=0.5)
                    except Exception:
                        continue
                    if s == "ok":
                        results[r] = torch.load(io.BytesIO(p), weights_only=False)
                    else:
                        errors[r] = p
                break
    finally:
        for proc in procs:
            proc.join(timeout=5.0 if not errors and len(results) == world_size else 0.5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
    return results, errors


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks and return the results by rank."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    for attempt in range(3):
        results, errors = _run_once(fn, world_size, free_port(), args, kwargs, timeout_s)
        # The store's port was taken between our check and its listen: a new port, not a test failure.
        if not (errors and all("EADDRINUSE" in e for e in errors.values()) and attempt < 2):
            break
    if errors or len(results) < world_size:
        missing = [r for r in range(world_size) if r not in results and r not in errors]
        lines = [f"{fn.__module__}.{fn.__name__} failed on {world_size} gloo ranks"]
        for rank in sorted(errors):
            lines.append(f"--- rank {rank} ---\n{errors[rank]}")
        if missing:
            lines.append(f"--- ranks {missing}: no result within {timeout_s:.0f} s (timeout or blocked) ---")
        raise DistributedTestError("\n".join(lines))
    return [results[rank] for rank in range(world_size)]
