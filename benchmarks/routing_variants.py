"""Routing variants at equal mean compute on the tiny CPU model: token choice, expert choice, ReMoE and null experts.

Runs ``megatron-moe-ext train`` (the embedded default: 2-layer GPT, hidden 64, 4 experts of 256, EP=2 on 2 gloo
ranks, byte-level stdlib corpus) once per variant and seed, one after the other, all at 2 real experts per token on
average (the accounting's ``expected_active_experts``):

* ``token choice``   Megatron's top-2 (its aux loss 1e-2, the demo's default);
* ``expert choice``  each expert takes c = ceil(T x 2 / 4 x 1.0) tokens of its group (capacity factor 1; no aux
                     loss: balanced by construction; the allgather dispatcher, as for every variable-row router);
* ``ReMoE``          ReLU gates with the adaptive L1 penalty, target sparsity 1 - 2/4 (allgather dispatcher);
* ``null experts``   top-4 over 4 real + 4 null experts: 4 x 4/8 = 2 real experts per token under balanced routing
                     (allgather dispatcher);
* ``token choice top-1``  Megatron's top-1 (with --moe-router-pre-softmax, which Megatron requires there): the
                     reference at the compute ReMoE reaches on this model (its gates settle near 1 active
                     expert whatever the target; RESULTS.md).

Every run but expert choice adds ``--moe-balance-metrics`` (expert choice refuses it: every expert takes exactly c
tokens of each group, MaxVio 0 by construction). Reported per run: the final train loss (Megatron's ``lm loss``, mean of
the last ``--last`` logged iterations), the validation loss at the end (for expert choice with its causal rule, and
the batch choice beside it), and from the same iterations the mean MaxVio (``max_violation``, our balance metric:
over the router's N + M outputs with null experts), active experts per token (``active_experts`` as the routers
log it; token choice has exactly top-k = 2) and the null fraction (``null_fraction``). Then the mean over seeds.
Not a timing benchmark. RESULTS.md records the 300-iteration table of:

    python benchmarks/routing_variants.py --iters 300 --seeds 1234,42 --markdown /tmp/routing_variants.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_description, markdown_table

NO_AUX = ["--moe-aux-loss-coeff", "0"]
ALLGATHER = ["--moe-token-dispatcher-type", "allgather"]
METRICS_FLAG = ["--moe-balance-metrics"]
# name -> the flags on top of the embedded default (4 experts, top-2). Expert choice refuses balance metrics: every
# expert takes exactly c tokens of each group, so its MaxVio is 0 by construction.
VARIANTS: dict[str, list[str]] = {
    "token choice": [*METRICS_FLAG],
    "expert choice": ["--moe-router-type", "expert_choice", "--moe-ec-capacity-factor", "1.0", *NO_AUX, *ALLGATHER],
    "ReMoE": ["--moe-router-type", "relu", *ALLGATHER, *METRICS_FLAG],
    "null experts": ["--moe-null-experts", "4", "--moe-router-topk", "4", *ALLGATHER, *METRICS_FLAG],
    # Token choice at the compute ReMoE settles at on this model (about 1 active expert, not its target 2).
    "token choice top-1": ["--moe-router-topk", "1", "--moe-router-pre-softmax", *METRICS_FLAG],
}
# Metrics read from Megatron's iteration lines (name as logged).
METRICS = ("lm loss", "max_violation", "active_experts", "null_fraction", "relu_sparsity", "relu_l1_coeff",
           "ec_unrouted_fraction")

_ITER = re.compile(r"\] iteration +(\d+)/ *\d+ \|(.*)")
_VALUE = {name: re.compile(rf"\| {re.escape(name)}: ([0-9.eE+-]+|nan|inf)") for name in METRICS}
_VALID = re.compile(r"validation loss at iteration (\d+) on validation set \| lm loss value: ([0-9.eE+-]+)"
                    r"(?:.*?lm loss \(batch choice\) value: ([0-9.eE+-]+))?")


def parse_log(stdout: str) -> tuple[list[dict[str, float]], dict[str, float] | None]:
    """(rows of every iteration line with an lm loss: {"iteration", metric: value}, the last validation line as
    {"iteration", "loss", "batch_choice_loss"(expert choice only)} or None)."""
    rows = []
    valid = None
    for line in stdout.splitlines():
        m = _ITER.search(line)
        if m:
            body = "|" + m.group(2)
            row = {"iteration": float(m.group(1))}
            for name, pattern in _VALUE.items():
                v = pattern.search(body)
                if v:
                    row[name] = float(v.group(1))
            if "lm loss" in row:
                rows.append(row)
            continue
        v = _VALID.search(line)
        if v:
            valid = {"iteration": float(v.group(1)), "loss": float(v.group(2))}
            if v.group(3) is not None:
                valid["batch_choice_loss"] = float(v.group(3))
    return rows, valid


def train_command(iters: int, extra: list[str], workdir: Path, seed: int) -> list[str]:
    return [
        sys.executable, "-m", "megatron_moe_ext", "train", *extra,
        "--train-iters", str(iters), "--lr-warmup-iters", str(min(10, max(1, iters // 10))),
        "--eval-interval", str(iters), "--eval-iters", "4", "--save-interval", str(10 * iters),
        "--save", str(workdir / "ckpt"), "--seed", str(seed),
    ]


def _mean(rows: list[dict[str, float]], name: str) -> float | None:
    values = [r[name] for r in rows if name in r]
    return sum(values) / len(values) if values else None


def run_variant(workdir: Path, iters: int, extra: list[str], last: int, seed: int) -> dict:
    """One training run; its final losses and load statistics (means over the last ``last`` logged iterations)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("MEGATRON_MOE_EXT_CACHE", str(workdir.parent / "cache"))
    cmd = train_command(iters, extra, workdir, seed)
    start = time.time()
    proc = subprocess.run(cmd, check=False, cwd=workdir, env=env, capture_output=True, text=True, timeout=7200,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows, valid = parse_log(proc.stdout)
    if not rows or valid is None:
        raise RuntimeError(f"no iteration line with lm loss, or no validation line, in the output of {' '.join(cmd)}")
    tail = rows[-last:]
    return {
        "train_loss": _mean(tail, "lm loss"), "valid_loss": valid["loss"],
        "valid_loss_batch_choice": valid.get("batch_choice_loss"),
        **{name: _mean(tail, name) for name in METRICS if name != "lm loss"},
        "iters_logged": len(rows), "seconds": time.time() - start,
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table_rows(results: dict[str, dict[int, dict]], seeds: list[int]) -> list[list[str]]:
    """One row per (variant, seed) and one mean row per variant."""
    out = []
    for name, by_seed in results.items():
        runs = [by_seed[s] for s in seeds if s in by_seed]
        for label, r in [*((str(s), by_seed[s]) for s in seeds if s in by_seed), ("mean", _mean_run(runs))]:
            active = r["active_experts"]
            if active is None and name == "token choice":
                active = 2.0  # exactly top-k; Megatron's TopKRouter logs no active_experts
            valid = _fmt(r["valid_loss"])
            if r.get("valid_loss_batch_choice") is not None:
                valid += f" (batch choice {_fmt(r['valid_loss_batch_choice'])})"
            maxvio = _fmt(r["max_violation"])
            if r["max_violation"] is None and name == "expert choice":
                maxvio = "0 (by construction)"
            out.append([name, label, _fmt(r["train_loss"]), valid, maxvio, _fmt(active, 2), _fmt(r["null_fraction"])])
    return out


def _mean_run(runs: list[dict]) -> dict:
    keys = {k for r in runs for k in r}
    mean = {}
    for k in keys:
        values = [r[k] for r in runs if r.get(k) is not None]
        mean[k] = sum(values) / len(values) if values else None
    return mean


HEADER = ["variant", "seed", "train loss", "valid loss", "MaxVio", "active experts", "null fraction"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300, help="training iterations per run")
    parser.add_argument("--seeds", default="1234,42", help="comma-separated seeds, one run per variant and seed")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--last", type=int, default=20, help="average train loss and load over the last N iterations")
    parser.add_argument("--workdir", default=None, help="run directories (default: a temporary one)")
    parser.add_argument("--markdown", default=None, help="append a Markdown section to this file")
    parser.add_argument("--json", default=None, help="write all results as JSON")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} is not a comma-separated list of integers; fix: e.g. --seeds 1234,42")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names or not seeds:
        parser.error(f"--variants {unknown or names} / --seeds {seeds}: fix: variants from {', '.join(VARIANTS)} "
                     "and at least one seed")
    if args.iters < 1 or args.last < 1:
        parser.error(f"--iters {args.iters} and --last {args.last} must be >= 1")
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="routing_variants_"))
    results: dict[str, dict[int, dict]] = {}
    for name in names:
        for seed in seeds:
            print(f"[{name}, seed {seed}] training {args.iters} iterations ...", flush=True)
            r = run_variant(root / f"{name.replace(' ', '_')}_s{seed}", args.iters, VARIANTS[name], args.last, seed)
            results.setdefault(name, {})[seed] = r
            print(f"[{name}, seed {seed}] train loss {_fmt(r['train_loss'])}, valid loss {_fmt(r['valid_loss'])}, "
                  f"MaxVio {_fmt(r['max_violation'])}, active experts {_fmt(r['active_experts'], 2)}, null fraction "
                  f"{_fmt(r['null_fraction'])} ({r['seconds']:.0f} s)", flush=True)
    table = markdown_table(HEADER, table_rows(results, seeds))
    print(table)
    if args.json:
        with open(args.json + ".tmp", "w") as fh:
            by_seed = {n: {str(s): r for s, r in by.items()} for n, by in results.items()}
            json.dump({"iters": args.iters, "seeds": seeds, "last": args.last, "results": by_seed}, fh, indent=1)
        os.replace(args.json + ".tmp", args.json)
    if args.markdown:
        machine = "; ".join(f"{k}: {v}" for k, v in machine_description().items())
        subset = "" if names == list(VARIANTS) else f" --variants '{','.join(names)}'"
        section = (f"## Routing variants at equal mean compute (CPU, {args.iters} iterations)\n\n{machine}\n\n"
                   f"Command: `python benchmarks/routing_variants.py --iters {args.iters} "
                   f"--seeds {','.join(map(str, seeds))}{subset}`; train loss and load: mean of the last {args.last} "
                   f"iterations.\n\n{table}\n")
        with open(args.markdown, "a") as fh:
            fh.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
