"""``sweep collect DIR``: one results row per finished run (the table ``fit`` reads).

Columns (the shared contract with ``fit``): run, kind, seed, budget_flops, params (active non-embedding, router
included), total_params (non-embedding), tokens, granularity, experts, topk, expansion_rate (empty for dense
rows), flops (training FLOPs per token x tokens), loss (the last "on validation set" evaluation), best_loss (the
least validation loss the log shows, periodic or final; never the test set), final_train_loss (mean lm loss of
the last min(20, iterations) iterations), iterations.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from megatron_moe_ext.scaling.atomic_files import write_text_atomic
from megatron_moe_ext.scaling.log_parsing import finished, parse_train_log
from megatron_moe_ext.scaling.sweep_run import is_done, load_plan

RESULT_COLUMNS = ("run", "kind", "seed", "budget_flops", "params", "total_params", "tokens", "granularity",
                  "experts", "topk", "expansion_rate", "router", "flops", "loss", "best_loss", "final_train_loss",
                  "iterations")
TRAIN_LOSS_WINDOW = 20


def result_row(row: dict[str, Any], log_text: str) -> dict[str, Any]:
    """The results row of planned run ``row`` from its train.log text; ValueError if the log is not finished."""
    log = parse_train_log(log_text)
    iters = int(row["iterations"])
    why = finished(log, iters)
    if why is not None:
        raise ValueError(f"run {row['run']}: {why}; fix: `megatron-moe-ext sweep run` it again")
    final = [loss for it, loss, is_final in log.validation if is_final and it == iters][-1]
    window = range(max(1, iters - min(TRAIN_LOSS_WINDOW, iters) + 1), iters + 1)
    missing = [it for it in window if it not in log.train_loss]
    if missing:
        raise ValueError(f"run {row['run']}: the log lacks the lm loss of iterations {missing} (use --log-interval 1)")
    moe = row["kind"] == "moe"
    return {
        "run": row["run"], "kind": row["kind"], "seed": row["seed"], "budget_flops": row["budget_flops"],
        "params": row["params"], "total_params": row["total_params"], "tokens": row["tokens"],
        "granularity": row["granularity"] if moe else "", "experts": row["experts"] if moe else "",
        "topk": row["topk"] if moe else "", "expansion_rate": row["expansion_rate"] if moe else "",
        # plans written before the router axis (issue #22) have no router column: token choice
        "router": row.get("router") or "topk" if moe else "", "flops": row["flops"], "loss": final, "best_loss": min(loss for _, loss, _ in log.validation),
        "final_train_loss": sum(log.train_loss[it] for it in window) / len(window), "iterations": iters,
    }


def collect(plan_dir: str, *, out: str | None = None, partial: bool = False) -> tuple[str, list[str]]:
    """Write the results CSV (atomically); returns (its path, the unfinished runs left out). ValueError naming
    the unfinished runs and the fix unless ``partial``."""
    rows = load_plan(plan_dir)
    unfinished = [r["run"] for r in rows if not is_done(plan_dir, r)]
    if unfinished and not partial:
        raise ValueError(
            f"{len(unfinished)} of {len(rows)} runs are not finished: {', '.join(unfinished)}; fix: "
            f"`megatron-moe-ext sweep run {plan_dir}` (resumes them), or `sweep collect --partial` to collect only "
            "the finished ones"
        )
    results = []
    for row in rows:
        if row["run"] in unfinished:
            continue
        with open(os.path.join(plan_dir, row["run"], "train.log"), errors="replace") as fh:
            results.append(result_row(row, fh.read()))
    out = out or os.path.join(plan_dir, "results.csv")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(results)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_text_atomic(out, buf.getvalue())
    return out, unfinished
