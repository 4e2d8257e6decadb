"""``megatron-moe-ext sweep plan | run | collect``: a compute-matched granularity sweep (docs/sweeps.md).

    sweep plan --flops 1e13,3e13 --granularity 1,2,4 --expansion-rate 4 --hidden-size 48,64 --out DIR
               [--routers topk,expert_choice,relu,null] [-- FLAGS]
    sweep run DIR [--only RUN ...]
    sweep collect DIR [--out CSV] [--partial]

``plan`` never trains (it is its own dry run): it checks everything, then writes DIR/runs.csv, DIR/runs.json and
per run DIR/RUN/command.sh and DIR/RUN/slurm.sbatch, and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import csv
import io
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence

from megatron_moe_ext.scaling.sweep_plan import ROUTER_VARIANTS, PlannedRun, SweepSpec, plan_runs
from megatron_moe_ext.scaling.sweep_templates import COMMAND_SH, SLURM_SBATCH

# Each planner default is stated once, in SweepSpec.
_DEFAULT = {f.name: f.default for f in dataclasses.fields(SweepSpec)}


def _list(kind: type) -> object:
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(float(v)) if kind is int and "e" in v.lower() else kind(v)
                           for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        return values

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-moe-ext sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="write the compute-matched grid of runs (never trains)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       epilog="Flags after -- are appended to every run's `megatron-moe-ext train` command.")
    p.add_argument("--flops", type=_list(float), required=True, help="compute budgets in training FLOPs, e.g. 1e13,3e13")
    p.add_argument("--granularity", type=_list(int), required=True, help="granularities G (each must divide the FFN size)")
    p.add_argument("--expansion-rate", type=_list(int), required=True, help="expansion rates E (experts = E*G)")
    p.add_argument("--base-topk", type=int, default=_DEFAULT["base_topk"], help="base top-k k0 (top-k = k0*G)")
    p.add_argument("--hidden-size", type=_list(int), required=True, help="model sizes: hidden sizes, e.g. 48,64,96")
    p.add_argument("--seeds", type=_list(int), default=_DEFAULT["seeds"], help="seeds, one run each")
    p.add_argument("--num-layers", type=int, default=_DEFAULT["num_layers"], help="layers")
    p.add_argument("--num-attention-heads", type=int, default=_DEFAULT["num_attention_heads"], help="attention heads (must divide every hidden size)")
    p.add_argument("--ffn-hidden-size", type=int, default=_DEFAULT["ffn_hidden_size"], help="dense FFN size d_ff (experts are d_ff/G)")
    p.add_argument("--seq-length", type=int, default=_DEFAULT["seq_length"], help="sequence length (and max positions)")
    p.add_argument("--vocab-size", type=int, default=_DEFAULT["vocab_size"],
                   help="the tokenizer's vocabulary, for the accounting (default: the demo's byte tokeniser)")
    p.add_argument("--global-batch-size", type=int, default=_DEFAULT["global_batch_size"], help="sequences per iteration")
    p.add_argument("--micro-batch-size", type=int, default=_DEFAULT["micro_batch_size"], help="sequences per micro batch")
    p.add_argument("--nproc", type=int, default=_DEFAULT["nproc"], help="local ranks per run")
    p.add_argument("--expert-parallel-size", type=int, default=_DEFAULT["expert_parallel_size"], help="expert parallel size")
    p.add_argument("--max-iters", type=int, default=_DEFAULT["max_iters"], help="refuse budgets needing more iterations than this")
    p.add_argument("--save-interval", type=int, default=_DEFAULT["save_interval"], help="checkpoint every N iterations (and at the end)")
    p.add_argument("--eval-iters", type=int, default=_DEFAULT["eval_iters"], help="validation batches per evaluation")
    p.add_argument("--routers", type=_list(str), default=_DEFAULT["routers"],
                   help=f"router axis at equal mean compute, from {','.join(ROUTER_VARIANTS)} (docs/routing-variants.md)")
    p.add_argument("--no-dense", action="store_true", help="leave out the dense baselines")
    p.add_argument("--out", required=True, help="plan directory (refused if non-empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    r = sub.add_parser("run", help="run the plan's unfinished runs (resumable)")
    r.add_argument("plan_dir")
    r.add_argument("--only", action="extend", nargs="+", default=[], metavar="RUN", help="run only these runs")
    c = sub.add_parser("collect", help="results table of the finished runs")
    c.add_argument("plan_dir")
    c.add_argument("--out", default=None, help="results CSV (default PLAN_DIR/results.csv)")
    c.add_argument("--partial", action="store_true", help="collect the finished runs only, list the others")
    return parser


def _spec(args: argparse.Namespace, extra: Sequence[str]) -> SweepSpec:
    return SweepSpec(
        budgets=args.flops, hidden_sizes=args.hidden_size, granularities=args.granularity,
        expansion_rates=args.expansion_rate, base_topk=args.base_topk, seeds=args.seeds, num_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.ffn_hidden_size,
        seq_length=args.seq_length, vocab_size=args.vocab_size, global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size, nproc=args.nproc, expert_parallel_size=args.expert_parallel_size,
        max_iters=args.max_iters, save_interval=args.save_interval, eval_iters=args.eval_iters,
        dense_baselines=not args.no_dense, routers=args.routers, extra_args=tuple(extra),
    )


def _summary(run: PlannedRun) -> str:
    router = "" if run.router in (None, "topk") else f", router {run.router} ({run.active_experts:g} experts/token)"
    null = f" + {run.null_experts} null" if run.null_experts else ""
    moe = (f"G={run.granularity} E={run.expansion_rate}: {run.experts}{null} experts x {run.expert_size}, "
           f"top-{run.topk}{router}" if run.kind == "moe" else f"dense FFN {run.ffn_hidden_size}")
    return (f"h={run.hidden_size}, {moe}; {run.iterations} iterations, {run.tokens} tokens, "
            f"{run.flops:.4g} FLOPs (budget {run.budget_flops:.4g})")


def _slurm_args(run: PlannedRun) -> list[str]:
    args = list(run.train_args)
    i = args.index("--nproc")
    return args[:i] + args[i + 2:]


def _table(runs: Sequence[PlannedRun]) -> str:
    cols = ("run", "kind", "iterations", "tokens", "params", "total_params", "flops")
    rows = [[str(getattr(r, c)) if c != "flops" else f"{r.flops:.4g}" for c in cols] for r in runs]
    width = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, width))  # noqa: E731
    return "\n".join([line(cols), *(line(row) for row in rows)])


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def write_plan(runs: Sequence[PlannedRun], out: str, *, force: bool) -> str:
    """Write the plan into ``out`` atomically (built in a temporary sibling, then renamed). Returns a note."""
    rows = [r.row() for r in runs]
    plan_json = json.dumps({"runs": rows}, indent=1) + "\n"
    if os.path.isdir(out) and os.listdir(out):
        existing = os.path.join(out, "runs.json")
        if os.path.isfile(existing) and _read(existing) == plan_json:
            return f"{out} already holds this plan (identical runs.json); nothing written"
        if not force:
            raise ValueError(
                f"--out {out} is not empty and holds a different plan or other files; fix: another --out, or --force "
                "to replace it (its runs, checkpoints and logs are deleted)"
            )
    elif os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file; fix: name a directory")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".sweep-plan-", dir=parent)
    try:
        with open(os.path.join(tmp, "runs.json"), "w") as fh:
            fh.write(plan_json)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with open(os.path.join(tmp, "runs.csv"), "w") as fh:
            fh.write(buf.getvalue())
        for run in runs:
            run_dir = os.path.join(tmp, run.run)
            os.makedirs(run_dir)
            fields = dict(run=run.run, kind=run.kind, summary=_summary(run))
            for name, template, args, mode in (
                ("command.sh", COMMAND_SH, run.train_args, 0o755),
                ("slurm.sbatch", SLURM_SBATCH, _slurm_args(run), 0o644),
            ):
                path = os.path.join(run_dir, name)
                with open(path, "w") as fh:
                    fh.write(template.substitute(fields, args=shlex.join(args), gpus_per_node=8, time_limit="04:00:00"))
                os.chmod(path, mode)
        if os.path.isdir(out):
            old = out.rstrip("/") + f".old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return f"wrote {len(runs)} runs to {out} (runs.csv, runs.json, RUN/command.sh, RUN/slurm.sbatch)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = _parser()
    args = parser.parse_args(argv)
    if extra and args.command != "plan":
        parser.error(f"extra train flags after -- are for `sweep plan` only (got {extra})")
    if args.command == "plan":
        try:
            runs = plan_runs(_spec(args, extra))
            note = write_plan(runs, args.out, force=args.force)
        except ValueError as err:
            parser.error(str(err))
        print(_table(runs))
        print(note)
        return 0
    if args.command == "run":
        from megatron_moe_ext.scaling.sweep_run import run_sweep

        try:
            return run_sweep(args.plan_dir, only=args.only)
        except ValueError as err:
            parser.error(str(err))
    from megatron_moe_ext.scaling.sweep_collect import collect

    try:
        path, left_out = collect(args.plan_dir, out=args.out, partial=args.partial)
    except ValueError as err:
        parser.error(str(err))
    print(f"wrote {path}")
    if left_out:
        print(f"left out {len(left_out)} unfinished run(s): {', '.join(left_out)}")
    return 0
