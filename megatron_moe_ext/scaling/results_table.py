"""Read and validate results tables (``sweep collect`` output, or a plain CSV of published points) for ``fit``.

Columns used: ``params`` (N; the sweep writes ACTIVE non-embedding parameters, ``--params-column
total_params`` picks the total), ``tokens`` (D), ``granularity`` (G; empty = a dense baseline row, left out
of the MoE law and counted), ``loss``, and ``experts`` (E) for the joint law. Every refusal is a ValueError
naming the file, row, column, value and the fix.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from megatron_moe_ext.scaling import laws
from megatron_moe_ext.scaling.fitting import Points


@dataclasses.dataclass(frozen=True)
class Table:
    points: Points
    dense_rows: int  # rows with an empty granularity, left out
    sources: tuple[str, ...]


def read_results(paths: Sequence[str], *, law: str, params_column: str = "params") -> Table:
    """Concatenate the CSVs and return the MoE points of ``law`` (validated; module docstring)."""
    if law not in laws.LAWS:
        raise ValueError(f"law={law!r} is unknown; choose from {', '.join(laws.LAWS)}")
    other = "granularity" if law == "krajewski2024" else "experts"
    needed = [params_column, "tokens", "granularity", "loss"] + (["experts"] if law == "joint2025" else [])
    rows: list[tuple[float, float, float, float]] = []
    dense = 0
    for path in paths:
        try:
            handle = open(path, newline="")
        except OSError as err:
            raise ValueError(f"cannot read results table {path}: {err.strerror}; fix: pass a CSV written by "
                             "`megatron-moe-ext sweep collect` or one with columns params,tokens,granularity,loss") from err
        with handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in needed if c not in header]
            if missing:
                raise ValueError(
                    f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(header) or 'no header'}); "
                    f"fix: the {law} fit needs a header row with {', '.join(needed)}"
                    + (" (experts: routed experts per MoE layer)" if "experts" in missing else ""))
            for line, row in enumerate(reader, start=2):
                if not (row.get("granularity") or "").strip():
                    dense += 1
                    continue
                values = []
                for col in (params_column, "tokens", other, "loss"):
                    text = (row.get(col) or "").strip()
                    try:
                        value = float(text)
                    except ValueError:
                        raise ValueError(f"{path} line {line}: {col}={text!r} is not a number; fix: write a number "
                                         "(or drop the row)") from None
                    if not math.isfinite(value) or value <= 0:
                        raise ValueError(f"{path} line {line}: {col}={text} must be a finite number > 0; fix: "
                                         "correct or drop the row (a failed run has no loss)")
                    values.append(value)
                rows.append(tuple(values))
    if not rows:
        raise ValueError(f"{', '.join(paths)}: no MoE rows (rows with a granularity; {dense} dense rows left out); "
                         "fix: run MoE configurations (`megatron-moe-ext sweep run`) before fitting")
    arr = np.array(rows, dtype=float)
    return Table(points=Points(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]), dense_rows=dense, sources=tuple(paths))


# N and D values closer than this ratio count as one size when identifying an exponent: a compute-matched sweep's
# N differs between granularities by the router's parameters alone (under 5% at the tiny scale), and its D by the
# rounding to whole iterations; neither spread can pin down alpha or beta.
SAME_SIZE_RATIO = 1.05


def distinct_sizes(values: np.ndarray) -> int:
    """How many sizes ``values`` holds, values within SAME_SIZE_RATIO of the previous (sorted) one counted as one."""
    logs = np.sort(np.log(np.asarray(values, dtype=float)))
    return int(1 + np.sum(np.diff(logs) > np.log(SAME_SIZE_RATIO))) if len(logs) else 0


def check_identifiable(points: Points, *, law: str, fixed: dict[str, float]) -> None:
    """Refuse a fit the data cannot support: fewer points than free coefficients + 1, or too few distinct
    values of N, D, G (E) for the exponents that need them (unless those are held by ``--fix``)."""
    free = [k for k in laws.COEFFICIENTS[law] if k not in fixed]
    if len(points) < len(free) + 1:
        raise ValueError(
            f"{len(points)} points cannot fit the {len(free)} free coefficients of {law} ({', '.join(free)}): need at "
            f"least {len(free) + 1}; fix: run more configurations, or hold coefficients with --fix (e.g. "
            "--fix alpha=0.115 --fix gamma=0.58, Krajewski et al. 2024 Table 1)")
    distinct = {"params": distinct_sizes(points.params), "tokens": distinct_sizes(points.tokens),
                "granularity": len(np.unique(points.other)), "experts": len(np.unique(points.other))}
    for coefficient, (column, need) in laws.NEEDS[law].items():
        if coefficient in fixed:
            continue
        have = distinct[column]
        if have < need:
            preset = laws.PRESETS["krajewski2024"].coefficients
            example = f"{coefficient}={preset[coefficient]}" if coefficient in preset else f"{coefficient}=0"
            within = f" (values within {SAME_SIZE_RATIO - 1:.0%} counted as one)" if column in ("params", "tokens") else ""
            raise ValueError(
                f"{have} distinct {column} value(s){within} cannot identify {coefficient} of {law} (needs >= {need}); fix: "
                f"run configurations with more distinct {column} values, or hold it with --fix {example}")
