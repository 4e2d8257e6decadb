"""Is finer better at equal compute at this scale? Summary of a compute-matched granularity study (issue #21).

The study itself is four documented commands (docs/sweeps.md, docs/scaling-laws.md); this script only reads
what they wrote and prints one Markdown section:

    megatron-moe-ext sweep plan --flops 1e11,3e11,1e12 --granularity 1,2,4,8,16 --expansion-rate 4 \\
        --hidden-size 48,96 --seeds 1,2 --save-interval 500 --eval-iters 8 --out runs/study
    megatron-moe-ext sweep run runs/study
    megatron-moe-ext sweep collect runs/study
    megatron-moe-ext fit runs/study/results.csv --law krajewski2024 --json runs/study/law.json \\
        --plot runs/study/fit.png
    python benchmarks/granularity_study.py runs/study [--markdown OUT.md]

Per (budget, hidden size): the final validation loss of every G and of the two dense baselines, mean over
seeds, and the verdict on "finer is better": d = mean(L at the largest G) - mean(L at G = 1), compared with
the seed noise of that cell, s = sqrt(mean over the cell's configurations of (L_seed1 - L_seed2)^2 / 2) (the
pooled per-run standard deviation from pairs); with two seeds per mean, the difference of two means has
standard deviation s, so |d| <= 2 s reads "no difference within the seed spread". Also the least-squares
slope of loss against log2 G (all seeds) per cell. Not a test: the numbers are whatever the runs measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _hidden(run: str) -> str:
    """The planner names runs b<budget>_h<hidden>_...: the hidden-size token."""
    return next(part for part in run.split("_") if part.startswith("h") and part[1:].isdigit())[1:]


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of loss against log2 G."""
    xs = [math.log2(g) for g, _ in points]
    ys = [loss for _, loss in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def summarize(study: Path) -> str:
    rows = _rows(study / "results.csv")
    cells: dict[tuple[float, str], dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        config = f"G={row['granularity']}" if row["kind"] == "moe" else row["kind"]
        cells[(float(row["budget_flops"]), _hidden(row["run"]))][config][row["seed"]] = float(row["loss"])
    gs = sorted({int(r["granularity"]) for r in rows if r["kind"] == "moe"})
    columns = [f"G={g}" for g in gs] + ["dense_equal_compute", "dense_equal_params"]
    lines = [
        "| budget (FLOPs) | hidden | " + " | ".join(columns) + " | best | d = L(G max) - L(G=1) | seed s | verdict"
        " | slope per doubling of G |",
        "|---" * (len(columns) + 7) + "|",
    ]
    verdicts = []
    for (budget, hidden), configs in sorted(cells.items()):
        means = {c: statistics.fmean(v.values()) for c, v in configs.items()}
        pairs = [list(v.values()) for v in configs.values() if len(v) == 2]
        s = math.sqrt(statistics.fmean([(a - b) ** 2 / 2 for a, b in pairs])) if pairs else float("nan")
        d = means[f"G={gs[-1]}"] - means[f"G={gs[0]}"]
        verdict = ("finer better" if d < -2 * s else "coarser better" if d > 2 * s
                   else "no difference within the seed spread")
        verdicts.append(verdict)
        best = min(means, key=means.get)
        slope = _slope([(float(c[2:]), loss) for c, v in configs.items() if c.startswith("G=") for loss in v.values()])
        cells_text = " | ".join(f"{means[c]:.4f}" if c in means else "-" for c in columns)
        lines.append(f"| {budget:.0e} | {hidden} | {cells_text} | {best} | {d:+.4f} | {s:.4f} | {verdict} | "
                     f"{slope:+.4f} |")
    law = study / "law.json"
    if law.is_file():
        fitted = json.loads(law.read_text())
        lines += ["", f"Fit ({fitted['law']}, {fitted['n_points']} points, RMSE {fitted['rmse']:.4f}, held-out "
                  f"({fitted.get('heldout', '')}) RMSE {fitted['heldout_rmse']:.4f}; "
                  f"{fitted.get('confidence', 0.9):.0%} bootstrap intervals):", "",
                  "| coefficient | value | interval |", "|---|---|---|"]
        for name, value in fitted["coefficients"].items():
            lo_hi = fitted.get("intervals", {}).get(name)
            interval = f"[{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else "held fixed"
            lines.append(f"| {name} | {value:.4g} | {interval} |")
    counts = {v: verdicts.count(v) for v in sorted(set(verdicts))}
    lines += ["", "Verdicts over the (budget, hidden) cells: " + ", ".join(f"{v}: {n}" for v, n in counts.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="a sweep directory after `sweep collect` (results.csv)")
    parser.add_argument("--markdown", type=Path, help="also write the summary here (atomically)")
    args = parser.parse_args(argv)
    if not (args.study / "results.csv").is_file():
        parser.error(f"{args.study}/results.csv does not exist; fix: megatron-moe-ext sweep collect {args.study}")
    text = summarize(args.study)
    print(text)
    if args.markdown:
        fd, tmp = tempfile.mkstemp(dir=args.markdown.parent or Path("."), prefix=".study-", suffix=".md")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
