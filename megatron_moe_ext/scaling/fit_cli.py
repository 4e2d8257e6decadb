"""``megatron-moe-ext fit RESULTS.csv [...] --law {krajewski2024,joint2025} [--json OUT] [--plot OUT.png]``.

Fits a fine-grained MoE scaling law (``laws``) to one or more results tables (``results_table``; dense rows
are left out and counted) with ``fitting.fit_law``: Huber on log-loss, L-BFGS from a grid of starts,
percentile-bootstrap intervals, leave-one-out RMSE. Prints the coefficients with their intervals, RMSE and
held-out RMSE; ``--json`` writes the coefficients file ``plan --law-json`` reads (atomically). Coefficients
the data cannot identify are refused (one model size cannot give alpha, ...) unless held with ``--fix``.
Bad input exits 2 with the values and the fix; nothing here imports megatron-core.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

PROG = "megatron-moe-ext fit"


def _parser() -> argparse.ArgumentParser:
    from megatron_moe_ext.scaling.laws import LAWS

    p = argparse.ArgumentParser(prog=PROG, description="Fit a fine-grained MoE scaling law to results tables.")
    p.add_argument("results", nargs="+", metavar="RESULTS.csv",
                   help="results tables (sweep collect output, or CSV with params,tokens,granularity,loss[,experts])")
    p.add_argument("--law", choices=LAWS, default="krajewski2024",
                   help="krajewski2024: L = c + (g/G^gamma + a)/N^alpha + b/D^beta; joint2025: varies experts E")
    p.add_argument("--json", metavar="OUT.json", help="write coefficients, intervals and RMSEs (for plan --law-json)")
    p.add_argument("--plot", metavar="OUT.png", help="loss vs compute per G with the fitted curves, and residuals")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (default 200)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--confidence", type=float, default=0.9, help="interval coverage (default 0.9)")
    p.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE",
                   help="hold a coefficient the data cannot identify, e.g. --fix alpha=0.115 (repeatable)")
    p.add_argument("--params-column", choices=("params", "total_params"), default="params",
                   help="N: active (params, default) or total (total_params) non-embedding parameters")
    p.add_argument("--starts", choices=("full", "small"), default="full",
                   help="grid of L-BFGS starting points: full (128 for krajewski2024) or small (16)")
    return p


def format_fit(result, *, dense_rows: int, sources: Sequence[str]) -> str:
    pct = round(100 * result.confidence)
    lines = [f"{result.law} fit of {result.n_points} points from {', '.join(sources)}"
             + (f" ({dense_rows} dense rows left out)" if dense_rows else ""),
             f"{'coefficient':<12} {'value':>12} {f'{pct}% interval':>28}"]
    for name, value in result.coefficients.items():
        lo, hi = result.intervals[name]
        held = "  (held by --fix)" if name in result.fixed else ""
        lines.append(f"{name:<12} {value:>12.5g} {f'[{lo:.5g}, {hi:.5g}]':>28}{held}")
    lines.append(f"RMSE {result.rmse:.5f}   held-out RMSE (leave-one-out) {result.heldout_rmse:.5f}   (loss units)")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Fit, print, write; argument and input errors exit 2 (argparse's format)."""
    # The fit is thousands of tiny L-BFGS-B steps; a multi-threaded BLAS only adds contention (measured 10-20x
    # slower on a busy 2-core host). Effective when numpy is not imported yet (the command line); a caller's
    # own setting wins.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    parser = _parser()
    ns = parser.parse_args(list(argv))
    try:
        return _run(ns)
    except ValueError as err:
        parser.error(str(err))
    return 2  # unreachable: parser.error exits


def _run(ns: argparse.Namespace) -> int:
    from megatron_moe_ext.scaling import fitting, laws, results_table
    from megatron_moe_ext.scaling.atomic_files import write_json_atomic

    if ns.bootstrap < 0:
        raise ValueError(f"--bootstrap {ns.bootstrap} must be >= 0; fix: e.g. --bootstrap 200 (0: no intervals)")
    if not 0.0 < ns.confidence < 1.0:
        raise ValueError(f"--confidence {ns.confidence} must be in (0, 1); fix: e.g. --confidence 0.9")
    for out, what in ((ns.json, "--json"), (ns.plot, "--plot")):
        if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise ValueError(f"{what} {out}: its directory does not exist; fix: create it or choose another path")
    fixed = fitting.parse_fixed(ns.fix, ns.law)
    table = results_table.read_results(ns.results, law=ns.law, params_column=ns.params_column)
    results_table.check_identifiable(table.points, law=ns.law, fixed=fixed)
    result = fitting.fit_law(ns.law, table.points, fixed=fixed, bootstrap=ns.bootstrap, confidence=ns.confidence,
                             seed=ns.seed, grid=ns.starts)
    print(format_fit(result, dense_rows=table.dense_rows, sources=table.sources))
    degenerate = fitting.degenerate_terms(ns.law, result.coefficients)
    if degenerate:
        print(f"note: these data do not identify the law's {'; '.join(degenerate)} term(s): the fit explains the "
              "losses without them, so read their coefficients as unidentified, not as measured; fix: runs spanning "
              "more model sizes, tokens or granularities (longer, larger runs), or hold them with --fix")
    params = "active" if ns.params_column == "params" else "total"
    law = laws.Law(ns.law, result.coefficients, params=params, source=", ".join(table.sources))
    if ns.json:
        write_json_atomic(ns.json, {
            "law": ns.law,
            "coefficients": result.coefficients,
            "intervals": {k: list(v) for k, v in result.intervals.items()},
            "confidence": result.confidence,
            "rmse": result.rmse,
            "heldout_rmse": result.heldout_rmse,
            "heldout": "leave-one-out",
            "n_points": result.n_points,
            "source": law.source,
            "params": params,
            "fixed": result.fixed,
            "dense_rows_left_out": table.dense_rows,
            "bootstrap": ns.bootstrap,
            "unidentified_terms": degenerate,
        })
        print(f"wrote {ns.json}")
    if ns.plot:
        from megatron_moe_ext.scaling.fit_plots import plot_fit

        plot_fit(ns.plot, law, table.points, result.predicted)
        print(f"wrote {ns.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
