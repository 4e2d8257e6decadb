"""``megatron-moe-ext analyze`` and ``megatron-moe-ext compare``: routing traces from checkpoints, then a report.

The launcher half runs once, before any rank starts, and checks everything it can: the output directory (never
overwritten), each checkpoint (torch_dist, iteration present, has MoE/PEER layers), the layout (TP/EP against
``--nproc`` and the model), the data and the label file. Then, per checkpoint, it starts ``--nproc`` ranks of
:mod:`megatron_moe_ext.analysis.capture` (torchrun; gloo on CPU) that write a routing trace, and finally writes
the report (:func:`megatron_moe_ext.analysis.report.analyze_traces`) with the traces moved in beside it, under
``OUT/traces/NAME``. Until the very end everything lives in a temporary sibling of ``OUT``, so a failure leaves
nothing behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

_MODES = ("analyze", "compare")


def _parser(mode: str) -> argparse.ArgumentParser:
    compare = mode == "compare"
    p = argparse.ArgumentParser(
        prog=f"megatron-moe-ext {mode}",
        description=("Put two or more checkpoints side by side: routing statistics, plots and the CKA similarity "
                     "of their hidden states layer by layer, on the same tokens." if compare else
                     "Routing analysis of one checkpoint (or of existing traces): load, path diversity, "
                     "specialisation, plots and a Markdown report."))
    p.add_argument("--checkpoint", action="append", default=[], metavar="DIR",
                   help="a Megatron --save directory (torch_dist)" + ("; repeat for each model" if compare else ""))
    p.add_argument("--name", action="append", default=[], help="a name per --checkpoint (default: the directory's)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to load (default: the latest)")
    p.add_argument("--data", nargs="+", default=[], metavar="SRC",
                   help="dataset prefixes or text files; each source is one label (domain) unless --labels-file. "
                        "Default: four standard-library packages (asyncio, email, json, logging), one label each")
    p.add_argument("--labels-file", default=None,
                   help="one integer label per analysed token (.npy or text), instead of labels by source")
    p.add_argument("--out", required=True, help="report directory (must not exist)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens analysed, shared evenly by the sources")
    p.add_argument("--micro-batch-size", type=int, default=4, help="windows per rank per forward pass")
    p.add_argument("--nproc", type=int, default=1, help="ranks (CPU: gloo processes; GPU: one per GPU)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size to load the model at")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size to load the model at")
    p.add_argument("--hidden", action=argparse.BooleanOptionalAction, default=compare,
                   help="record hidden states (needed for CKA; default on for compare)")
    p.add_argument("--sample-p", type=float, default=1.0, help="fraction of tokens kept in the trace")
    p.add_argument("--seed", type=int, default=0, help="seed of the token sampling")
    p.add_argument("--trace-budget-mb", type=float, default=None, help="cap on each trace's size")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="progress lines on stderr")
    p.add_argument("--cache-dir", default=None, help="where text sources are tokenised to (default: train's)")
    if not compare:
        p.add_argument("--trace", action="append", default=[], metavar="DIR",
                       help="report on an existing trace instead of a checkpoint (repeatable)")
    return p


def _names(paths: Sequence[str], names: Sequence[str], what: str) -> list[str]:
    if names and len(names) != len(paths):
        raise ValueError(f"{len(names)} --name for {len(paths)} {what}; fix: one --name per {what[:-1]}, or none")
    out = list(names) or [os.path.basename(os.path.normpath(p)) or "model" for p in paths]
    bad = [n for n in out if not n or "/" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"--name {bad}: names become directory names; fix: no '/' and no leading '.'")
    if len(set(out)) != len(out):
        out = [f"{i}-{n}" for i, n in enumerate(out)]
    return out


def _check_out(out: str) -> str:
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise ValueError(f"--out {out} already exists; a previous report is never overwritten; fix: choose a new "
                         f"directory or delete that one")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: its parent {parent} is not a writable directory")
    return out


def _validate(ns: argparse.Namespace, mode: str) -> list[tuple[str, str, int]]:
    """(name, iteration dir, iteration) per checkpoint, after every check that needs no process group."""
    from megatron_moe_ext.analysis.checkpoint_model import (
        check_layout,
        read_checkpoint_args,
        resolve_iteration,
        routed_layers,
    )

    if mode == "compare" and len(ns.checkpoint) < 2:
        raise ValueError(f"compare needs two or more --checkpoint (got {len(ns.checkpoint)}); fix: repeat "
                         f"--checkpoint, or use analyze for one model")
    if not 0.0 < ns.sample_p <= 1.0:
        raise ValueError(f"--sample-p {ns.sample_p} must be in (0, 1]")
    if ns.micro_batch_size < 1:
        raise ValueError(f"--micro-batch-size {ns.micro_batch_size} must be >= 1")
    plans, routed_any, seq = [], False, set()
    for name, ckpt in zip(_names(ns.checkpoint, ns.name, "checkpoints"), ns.checkpoint):
        iter_dir, iteration = resolve_iteration(ckpt, ns.iteration)
        args = read_checkpoint_args(iter_dir)
        check_layout(args, tp=ns.tp, ep=ns.ep, world_size=ns.nproc)
        if routed_layers(args):
            routed_any = True
        elif mode == "analyze":
            raise ValueError(f"{ckpt}: the model has no MoE layers (no --num-experts, no --moe-peer-num-experts): "
                             f"nothing routes; fix: analyse an MoE checkpoint (compare accepts a dense model next to "
                             f"MoE ones)")
        seq.add(args.seq_length)
        plans.append((name, iter_dir, iteration))
    if not routed_any:
        raise ValueError("none of the checkpoints has MoE layers; fix: include at least one MoE model")
    if len(seq) > 1:
        raise ValueError(f"the checkpoints have different sequence lengths {sorted(seq)}; compare runs every model on "
                         f"the same windows: compare models trained at one --seq-length")
    ns.seq_length = seq.pop()
    return plans


# What a capture rank imports: the CPU path imports it once before forking its local ranks (``preload``).
_CAPTURE_MODULES: tuple[str, ...] = (
    "megatron.core.dist_checkpointing",
    "megatron.training.argument_utils",
    "megatron.training.global_vars",
    "megatron_moe_ext.specs",
    "megatron_moe_ext.analysis.checkpoint_model",
    "megatron_moe_ext.analysis.routing_recorder",
)


def _run_capture(plan_paths: Sequence[str], nproc: int) -> None:
    import torch

    if not torch.cuda.is_available():
        # Local gloo ranks forked from this process (runtime/local_ranks.py): megatron is imported once,
        # not once per rank. Nothing above ran a multi-threaded torch op, which fork requires.
        from megatron_moe_ext.analysis.capture import main as capture_main
        from megatron_moe_ext.runtime.local_ranks import start_local_ranks

        rc = start_local_ranks(capture_main, plan_paths, nproc, preload=_CAPTURE_MODULES)
        if rc != 0:
            raise RuntimeError(f"trace capture failed (exit code {rc}) on {nproc} local ranks")
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_moe_ext.analysis.capture", *plan_paths]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    from megatron_moe_ext.runtime.run_group import run_command

    rc = run_command(command, env=env)  # its own process group: no worker outlives this process
    if rc != 0:
        raise RuntimeError(f"trace capture failed (exit code {rc}): {' '.join(command)}")


def main(argv: Sequence[str] | None = None, mode: str = "analyze") -> int:
    """Entry of ``analyze``/``compare``; returns 0, or exits with argparse's usage error on bad input."""
    from megatron_moe_ext.analysis.capture import CapturePlan
    from megatron_moe_ext.analysis.report import analyze_traces
    from megatron_moe_ext.analysis.token_windows import (
        default_sources,
        load_token_windows,
    )
    from megatron_moe_ext.training.train import default_cache_dir

    parser = _parser(mode)
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        out = _check_out(ns.out)
        traces = getattr(ns, "trace", [])
        if traces:
            if ns.checkpoint:
                raise ValueError("--trace and --checkpoint together; fix: report on traces, or capture from "
                                 "checkpoints, not both")
            from megatron_moe_ext.analysis.trace_format import TraceReader

            for t in traces:
                TraceReader(t)  # names the problem if one is not a complete trace
            report = analyze_traces(dict(zip(_names(traces, ns.name, "traces"), traces)), out,
                                    cka=True, progress=ns.progress)
            print(f"report: {report}")
            return 0
        if not ns.checkpoint:
            raise ValueError("no --checkpoint (and no --trace); fix: --checkpoint DIR")
        plans = _validate(ns, mode)
        cache_dir = ns.cache_dir or default_cache_dir()
        work = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
        try:
            data_cache = os.path.join(cache_dir, "data")
            sources, names = (ns.data, None) if ns.data else default_sources(data_cache)
            windows = load_token_windows(sources, seq_length=ns.seq_length, max_tokens=ns.max_tokens,
                                         cache_dir=data_cache, labels_file=ns.labels_file, names=names)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    except ValueError as err:
        parser.error(str(err))
    try:
        windows_file = os.path.join(work, "windows.npz")
        windows.save(windows_file)
        trace_dirs, plan_paths = {}, []
        for name, iter_dir, iteration in plans:
            trace_dirs[name] = os.path.join(work, "traces", name)
            plan = CapturePlan(
                iter_dir=iter_dir, windows_file=windows_file, trace_dir=trace_dirs[name], iteration=iteration,
                tensor_parallel=ns.tp, expert_parallel=ns.ep, micro_batch_size=ns.micro_batch_size,
                hidden=ns.hidden, dense=mode == "compare", sample_p=ns.sample_p, seed=ns.seed,
                byte_budget=None if ns.trace_budget_mb is None else int(ns.trace_budget_mb * 2**20),
                progress=ns.progress, name=name)
            plan_path = os.path.join(work, f"plan-{len(trace_dirs)}.json")
            plan.save(plan_path)
            plan_paths.append(plan_path)
        _run_capture(plan_paths, ns.nproc)
        report_tmp = os.path.join(work, "report")
        analyze_traces(trace_dirs, report_tmp, cka=ns.hidden, progress=ns.progress,
                       display_dirs={n: f"traces/{n}" for n in trace_dirs})
        os.replace(os.path.join(work, "traces"), os.path.join(report_tmp, "traces"))
        os.replace(report_tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0


def analyze_main(argv: Sequence[str]) -> int:
    return main(argv, "analyze")


def compare_main(argv: Sequence[str]) -> int:
    return main(argv, "compare")
