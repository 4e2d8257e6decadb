"""Helpers shared by the benchmarks: interleaved timing, machine description, markdown tables.

Protocol: implementations are timed side by side in one process, interleaved (each repeat runs
every implementation once, the order alternating between repeats), and compared by the ratio of
their medians. Absolute times are context only: on a shared machine they drift, ratios measured
side by side drift much less. Timings are never test assertions.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from typing import Callable, Mapping, Sequence


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    *,
    setup: Callable[[str], object] | None = None,
    samples: dict[str, list[float]] | None = None,
    cpu_samples: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Median wall time (seconds) of each function, measured interleaved.

    Each of the ``warmup`` untimed rounds and ``repeats`` timed rounds calls every function once;
    the order is reversed every other round (A B, B A, A B, ...), so slow drifts of the machine
    (other jobs, frequency, allocator state) fall on both sides. ``setup(name)``, if given, runs
    untimed before each call (e.g. to clear gradients or restore RNG state). ``samples``, if
    given, receives every timed value per name, in round order (paired by index across names);
    ``cpu_samples`` likewise receives the process CPU time (all threads) of each call, a cross-check
    that is less sensitive than wall time to other jobs taking the cores away.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            if setup is not None:
                setup(name)
            gc.collect()
            cpu_start = time.process_time()
            start = time.perf_counter()
            fns[name]()
            elapsed = time.perf_counter() - start
            cpu_elapsed = time.process_time() - cpu_start
            if round_index >= warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu_elapsed)
    if samples is not None:
        samples.update(times)
    if cpu_samples is not None:
        cpu_samples.update(cpu_times)
    return {name: statistics.median(values) for name, values in times.items()}


def paired_ratios(samples: Mapping[str, Sequence[float]], numerator: str, denominator: str) -> list[float]:
    """Per-round ratios numerator/denominator of interleaved samples (same round, same index)."""
    return [a / b for a, b in zip(samples[numerator], samples[denominator])]


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's answer where that file is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _version(dist_name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_description() -> dict[str, str]:
    """CPU model, cores, memory, load, OS, Python, torch and megatron-core versions, torch threads."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    memory = _memory_gib()
    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "unknown"
    return {
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical ({usable} usable by this process)",
        "memory": f"{memory:.1f} GiB" if memory is not None else "unknown",
        "load average (1, 5, 15 min) at start": load,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron-core": _version("megatron-core"),
        "torch threads": str(torch.get_num_threads()),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are str()-ed, floats must be pre-formatted by the caller."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    for row in cells[1:]:
        if len(row) != len(headers):
            raise ValueError(f"row {row} has {len(row)} cells, the table has {len(headers)} columns")
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A fixed-width plain-text table for terminal output."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
