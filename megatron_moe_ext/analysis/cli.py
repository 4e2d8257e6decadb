"""``megatron-moe-ext analyze`` and ``megatron-moe-ext compare``: routing traces from checkpoints, then a report.

The launcher half runs once, before any rank starts, and checks everything it can: the output directory (never
overwritten), each checkpoint (torch_dist, iteration present, has MoE/PEER layers), the layout (TP/EP against
``--nproc`` and the model), the data and the label file. Then, per checkpoint, it starts ``--nproc`` ranks of
:mod:`megatron_moe_ext.analysis.capture` (torchrun; gloo on CPU) that write a routing trace, and finally writes
the report (:func:`megatron_moe_ext.analysis.report.analyze_traces`) with the traces moved in beside it, under
``OUT/traces/NAME``. ``--interventions``/``--readouts`` choose the rank-side instruments (``instrument_api``) the
capture ranks run, their options checked here against each model (``interventions_options``, each readout
module's ``check_options``, the probes' label counts); ``compare --sweep DIR`` takes the models and their roles
from a scaling-sweep directory (``questions_report.sweep_models``). Until the very end everything lives in a temporary sibling of ``OUT``, so a failure leaves
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
    else:
        p.add_argument("--sweep", default=None, metavar="DIR",
                       help="compare the finished runs of a scaling sweep directory (`megatron-moe-ext sweep plan/run`"
                            "), MoE runs next to their equal-compute and equal-parameter dense baselines, with a "
                            "section per research question; instead of --checkpoint/--name")
    _instrument_flags(p)
    return p


# Modules whose ``OPTIONS`` dict (name -> (type, default, help)) adds ``--name-with-dashes`` flags of a readout.
_OPTION_MODULES: tuple[str, ...] = (
    "megatron_moe_ext.analysis.logit_lens",
    "megatron_moe_ext.analysis.probes",
    "megatron_moe_ext.analysis.moefication",
)


def _readout_options() -> dict[str, tuple[type, object, str]]:
    import importlib

    options: dict[str, tuple[type, object, str]] = {}
    for module in _OPTION_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
            continue
        options.update(getattr(mod, "OPTIONS", {}))
    return options


def _instrument_flags(p: argparse.ArgumentParser) -> None:
    from megatron_moe_ext.analysis.instrument_api import INTERVENTIONS, READOUTS

    g = p.add_argument_group("interventions and readouts (docs/interpretability.md)")
    g.add_argument("--interventions", default=None, metavar="NAME[,NAME...]|all",
                   help=f"rerun the model with its routing changed, against the clean loss on the same tokens: "
                        f"{', '.join(INTERVENTIONS)}")
    g.add_argument("--readouts", default=None, metavar="NAME[,NAME...]|all",
                   help=f"read out what the experts do: {', '.join(READOUTS)}")
    g.add_argument("--ablate-experts", default=None, metavar="L:E[,L:E...]",
                   help="expert_ablation: each expert E of router layer L alone")
    g.add_argument("--ablate-top-m", default=None, metavar="M[,M...]",
                   help="expert_ablation: the M busiest experts of every router layer (busiest by a clean "
                        "calibration pass over all analysed tokens)")
    g.add_argument("--ablate-layers", default=None, metavar="L[,L...]",
                   help="expert_ablation: every routed expert of layer L (shared experts stay)")
    g.add_argument("--renormalize", action=argparse.BooleanOptionalAction, default=False,
                   help="expert_ablation: rescale a token's remaining gates to its clean gate sum (default: drop "
                        "the ablated share)")
    g.add_argument("--topk-values", default=None, metavar="K[,K...]",
                   help="topk_change: evaluate every top-k router at these k (default: k/2 and 2k)")
    g.add_argument("--frozen-paths", default=None, metavar="P[,P...|all]",
                   help="frozen_paths: routing restricted to the P most frequent top-1 paths (default 1,4,16,all)")
    g.add_argument("--copy-routing", default=None, metavar="SRC:DST[,...]",
                   help="layer_copy: layer DST routes as layer SRC did (default: each router layer from the one "
                        "before)")
    g.add_argument("--hurt-tokens", type=int, default=10, help="interventions: the most-hurt tokens listed per variant")
    for name, (kind, default, text) in _readout_options().items():
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            g.add_argument(flag, dest=name, type=kind, default=default, help=text)


def _names_list(text: str | None, known: Sequence[str], flag: str) -> tuple[str, ...]:
    """'a,b' or 'all' -> names, in the registry's order; ValueError naming the unknown ones and the known."""
    if text is None or text.strip() == "":
        return ()
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if parts == ["all"]:
        return tuple(known)
    unknown = [t for t in parts if t not in known]
    if unknown:
        raise ValueError(f"{flag} {text!r}: unknown {unknown}; fix: names from {', '.join(known)}, or all")
    return tuple(n for n in known if n in parts)


def _instrument_plan(ns: argparse.Namespace, iter_dirs: Sequence[str]) -> tuple[tuple[str, ...], list[dict],
                                                                              tuple[str, ...]]:
    """(rank-side instrument names, their options per checkpoint, trace readout names) after every check against
    each model (the interventions' defaults depend on the model: its router layers, k)."""
    from megatron_moe_ext.analysis.checkpoint_model import model_facts, read_checkpoint_args
    from megatron_moe_ext.analysis.instrument_api import INSTRUMENTS, INTERVENTIONS, READOUTS, TRACE_READOUTS
    from megatron_moe_ext.analysis.interventions_options import build_intervention_options

    interventions = _names_list(ns.interventions, INTERVENTIONS, "--interventions")
    readouts = _names_list(ns.readouts, READOUTS, "--readouts")
    options: dict = {name: getattr(ns, name) for name in _readout_options()}
    for name in readouts:
        if name in INSTRUMENTS or name in TRACE_READOUTS:
            _importable(name, INSTRUMENTS if name in INSTRUMENTS else TRACE_READOUTS)
            module = (INSTRUMENTS.get(name) or TRACE_READOUTS[name]).split(":")[0]
            check = getattr(sys.modules[module], "check_options", None)
            if check is not None:
                check(options)
    per_model = []
    for iter_dir in iter_dirs:
        facts = model_facts(read_checkpoint_args(iter_dir))
        model_options = dict(options)
        if facts.router_layers:  # a dense or PEER-only model: each intervention reports not_applicable
            model_options.update(build_intervention_options(
                names=interventions, facts=facts, ablate_experts=ns.ablate_experts, ablate_top_m=ns.ablate_top_m,
                ablate_layers=ns.ablate_layers, renormalize=ns.renormalize, topk_values=ns.topk_values,
                frozen_paths=ns.frozen_paths, copy_routing=ns.copy_routing, hurt_tokens=ns.hurt_tokens).as_dict())
        per_model.append(model_options)
    rank_side = tuple(n for n in (*interventions, *readouts) if n in INSTRUMENTS)
    trace_side = tuple(n for n in readouts if n in TRACE_READOUTS)
    for name in rank_side:
        _importable(name, INSTRUMENTS)
    return rank_side, per_model, trace_side


def _sweep_checkpoints(ns: argparse.Namespace) -> dict[str, str] | None:
    """With ``--sweep DIR``: the sweep's finished runs become ``--checkpoint``/``--name``; returns name -> role."""
    if ns.sweep is None:
        return None
    if ns.checkpoint or ns.name:
        raise ValueError("--sweep with --checkpoint/--name: the sweep names its models; fix: one or the other")
    from megatron_moe_ext.analysis.questions_report import sweep_models

    models = sweep_models(ns.sweep)
    ns.name = [name for name, _, _ in models]
    ns.checkpoint = [ckpt for _, ckpt, _ in models]
    return {name: role for name, _, role in models}


def _importable(name: str, table: dict[str, str]) -> None:
    """ValueError unless the module of instrument ``name`` imports here (before any rank starts)."""
    from megatron_moe_ext.analysis.instrument_api import load_entry

    try:
        load_entry(name, table)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{name}: its implementation {table[name]} is not available ({err}); fix: leave {name} "
                         f"out of --interventions/--readouts") from None


def _check_readout_data(readouts: Sequence[str], windows) -> None:
    """Readout checks that need the analysed tokens (the probes' label counts), before any rank starts."""
    if "probes" not in readouts:
        return
    import numpy as np

    from megatron_moe_ext.analysis.probes import check_probe_labels

    counts = np.bincount(windows.labels_WS.reshape(-1), minlength=len(windows.label_names))
    names = [windows.label_names[i] if i < len(windows.label_names) else str(i) for i in range(counts.size)]
    check_probe_labels({name: int(c) for name, c in zip(names, counts)})


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
    ns.instruments, ns.instrument_options, ns.trace_readouts = _instrument_plan(ns, [p[1] for p in plans])
    return plans


# What a capture rank imports: the CPU path imports it once before forking its local ranks (``preload``).
_CAPTURE_MODULES: tuple[str, ...] = (
    "megatron.core.dist_checkpointing",
    "megatron.training.argument_utils",
    "megatron.training.global_vars",
    "megatron_moe_ext.specs",
    "megatron_moe_ext.analysis.checkpoint_model",
    "megatron_moe_ext.analysis.routing_recorder",
    "megatron_moe_ext.analysis.interventions",
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
            if ns.interventions or ns.readouts:
                raise ValueError("--interventions/--readouts with --trace: they run the model (or were chosen when "
                                 "the trace was captured: its metadata \"readouts\"); fix: --checkpoint DIR instead "
                                 "of --trace")
            from megatron_moe_ext.analysis.trace_format import TraceReader

            for t in traces:
                TraceReader(t)  # names the problem if one is not a complete trace
            report = analyze_traces(dict(zip(_names(traces, ns.name, "traces"), traces)), out,
                                    cka=True, progress=ns.progress)
            print(f"report: {report}")
            return 0
        roles = _sweep_checkpoints(ns) if mode == "compare" else None
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
            _check_readout_data(ns.instruments, windows)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    except ValueError as err:
        parser.error(str(err))
    try:
        windows_file = os.path.join(work, "windows.npz")
        windows.save(windows_file)
        trace_dirs, plan_paths = {}, []
        for (name, iter_dir, iteration), options in zip(plans, ns.instrument_options):
            trace_dirs[name] = os.path.join(work, "traces", name)
            plan = CapturePlan(
                iter_dir=iter_dir, windows_file=windows_file, trace_dir=trace_dirs[name], iteration=iteration,
                tensor_parallel=ns.tp, expert_parallel=ns.ep, micro_batch_size=ns.micro_batch_size,
                hidden=ns.hidden, dense=mode == "compare", sample_p=ns.sample_p, seed=ns.seed,
                byte_budget=None if ns.trace_budget_mb is None else int(ns.trace_budget_mb * 2**20),
                progress=ns.progress, name=name, instruments=ns.instruments, options=options,
                readouts=ns.trace_readouts, role=None if roles is None else roles[name])
            plan_path = os.path.join(work, f"plan-{len(trace_dirs)}.json")
            plan.save(plan_path)
            plan_paths.append(plan_path)
        _run_capture(plan_paths, ns.nproc)
        report_tmp = os.path.join(work, "report")
        analyze_traces(trace_dirs, report_tmp, cka=ns.hidden, progress=ns.progress,
                       display_dirs={n: f"traces/{n}" for n in trace_dirs}, roles=roles)
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
