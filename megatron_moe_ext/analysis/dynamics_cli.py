"""``megatron-moe-ext dynamics``: how routing settles during training (router saturation, load, specialisation).

Input: the ``--save`` directory of a run trained with ``train --routing-checkpoints ITERS``: the routing
checkpoints in ``RUN/routing/iter_XXXXXXX`` (model only, torch_dist) and the run's final checkpoint in ``RUN``.
Every checkpoint is captured on the same token windows (the capture ranks of ``analyze``,
:mod:`megatron_moe_ext.analysis.capture`, one plan per checkpoint in the same ranks), each trace is summarised
(:func:`summary.summarize_trace`), and :func:`dynamics.dynamics_curves` compares each one with the final one.

``--dry-run`` runs every check and prints the plan. Refused before any rank starts (argparse usage error,
exit 2): an existing ``--out``, a run without routing
checkpoints, an ``--iterations`` entry that was not saved, checkpoints of different models (their saved
architecture arguments, top-k or sequence length differ), a layout that does not tile ``--nproc``.

Output (atomic: built in a temporary sibling of ``--out``, renamed at the end): ``report.md``, ``summary.json``
(the curves, :func:`dynamics.dynamics_json`, plus each checkpoint's routing summary), ``figures/dynamics.png``
and ``traces/iter_XXXXXXX``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

REPORT_FILE, SUMMARY_FILE, FIGURE = "report.md", "summary.json", "figures/dynamics.png"
# Saved arguments that must agree between the checkpoints of one saturation curve, besides the architecture.
_ROUTING_ARGS = ("moe_router_topk", "seq_length", "moe_peer_topk")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-moe-ext dynamics",
        description="Router saturation, load and specialisation over the routing checkpoints of a training run "
                    "(train --routing-checkpoints), each compared with the run's final checkpoint on the same "
                    "tokens.")
    p.add_argument("--run", required=True, metavar="SAVE_DIR",
                   help="the run's --save directory (routing checkpoints in SAVE_DIR/routing)")
    p.add_argument("--iterations", default=None,
                   help="comma-separated routing-checkpoint iterations to use (default: all saved)")
    p.add_argument("--out", required=True, help="report directory (must not exist)")
    p.add_argument("--data", nargs="+", default=[], metavar="SRC",
                   help="dataset prefixes or text files, one label each (default: four stdlib packages)")
    p.add_argument("--labels-file", default=None, help="one integer label per analysed token (.npy or text)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens analysed, shared evenly by the sources")
    p.add_argument("--micro-batch-size", type=int, default=4, help="windows per rank per forward pass")
    p.add_argument("--nproc", type=int, default=1, help="ranks (CPU: gloo processes; GPU: one per GPU)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size to load the models at")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size to load the models at")
    p.add_argument("--seed", type=int, default=0, help="seed of the token sampling")
    p.add_argument("--cache-dir", default=None, help="where text sources are tokenised to (default: train's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=sys.stderr.isatty(),
                   help="progress lines on stderr")
    p.add_argument("--dry-run", action="store_true",
                   help="run every check and print the checkpoints that would be captured; start no rank")
    return p


def checkpoint_plan(run: str, iterations: str | None) -> list[tuple[int, str, bool]]:
    """(iteration, iteration directory, is_final) per checkpoint, ascending, the final one last; ValueError when
    the run has no routing checkpoints or one asked for is missing."""
    from megatron_moe_ext.analysis.checkpoint_model import resolve_iteration
    from megatron_moe_ext.training.routing_checkpoints import ROUTING_SUBDIR, parse_iterations

    final_dir, final_it = resolve_iteration(run, None)
    if final_it is None:
        raise ValueError(f"--run {run}: a release checkpoint has no iteration to put on a training curve; fix: "
                         f"the --save directory of a training run")
    routing = os.path.join(run, ROUTING_SUBDIR)
    saved = sorted(int(d[5:]) for d in (os.listdir(routing) if os.path.isdir(routing) else [])
                   if d.startswith("iter_") and d[5:].isdigit())
    if not saved:
        raise ValueError(f"--run {run} has no routing checkpoints ({routing} holds no iter_*); fix: train with "
                         f"--routing-checkpoints ITERS (e.g. 0,10,50) and --save {run}")
    wanted = saved if iterations is None else list(parse_iterations(iterations))
    missing = [i for i in wanted if i not in saved]
    if missing:
        raise ValueError(f"--iterations {missing} were not saved in {routing} (saved: {saved}); fix: choose among "
                         f"those")
    plan = [(i, resolve_iteration(routing, i)[0], False) for i in wanted if i != final_it]
    return [*plan, (final_it, final_dir, True)]


def check_same_model(plan: Sequence[tuple[int, str, bool]]) -> Any:
    """The final checkpoint's saved arguments, after checking every checkpoint was saved by the same model
    (architecture, top-k, sequence length): ValueError naming each difference."""
    from megatron_moe_ext.analysis.checkpoint_model import read_checkpoint_args
    from megatron_moe_ext.args import saved_arg
    from megatron_moe_ext.checkpoint.torch_dist import architecture_differences

    final_dir = plan[-1][1]
    final = read_checkpoint_args(final_dir)
    for _, iter_dir, _ in plan[:-1]:
        args = read_checkpoint_args(iter_dir)
        diffs = architecture_differences(args, final)
        diffs += [(n, saved_arg(args, n), saved_arg(final, n)) for n in _ROUTING_ARGS
                  if saved_arg(args, n) != saved_arg(final, n)]
        if diffs:
            listed = ", ".join(f"{n} {a!r} vs {b!r}" for n, a, b in diffs)
            raise ValueError(f"{iter_dir} and the final checkpoint {final_dir} are different models ({listed}); a "
                             f"saturation curve compares checkpoints of one run; fix: --run the --save directory of "
                             f"one training run")
    return final


def _markdown(doc: dict[str, Any]) -> str:
    from megatron_moe_ext.analysis.summary import fmt

    d = doc["dynamics"]
    md = ["# Routing over training", "",
          (f"Run `{doc['run']}`: checkpoints at iterations {', '.join(map(str, d['iterations']))} (final "
           f"{d['final_iteration']}), each run on the same {doc['num_tokens']} tokens. Training tokens = iteration "
           f"x {d['tokens_per_iteration']} (global batch x sequence length). Every number is in `{SUMMARY_FILE}`."),
          "",
          ("Router saturation (OLMoE, arXiv 2409.02060 sec. 5.1) = mean over tokens of |top-k at the checkpoint ∩ "
           "top-k at the final checkpoint| / k (1 = final routing; chance = k / N). Load distance = total-variation "
           "distance of the layer's load shares from the final ones. Label MI = corrected MI of the top-1 expert "
           "and the label (nats)."), ""]
    header = ["layer", "statistic", *[f"iter {i}" for i in d["iterations"]]]
    md += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for layer, c in d["layers"].items():
        for key, name in (("saturation", "saturation"), ("load_distance", "load distance"),
                          ("max_violation", "MaxVio"), ("label_mi_corrected", "label MI corrected")):
            md.append("| " + " | ".join([layer, name, *[fmt(v) for v in c[key]]]) + " |")
        md.append("| " + " | ".join([layer, "chance saturation (k / N)", fmt(c["chance_saturation"]),
                                     *[""] * (len(d["iterations"]) - 1)]) + " |")
    md += ["", f"![routing over training]({FIGURE})", ""]
    return "\n".join(md)


def write_dynamics_report(trace_dirs: dict[int, str], out_dir: str, *, run: str, final_iteration: int,
                          tokens_per_iteration: int, progress: bool = False) -> dict[str, Any]:
    """Summaries, curves, figure and report of traces (iteration -> trace directory) written into ``out_dir``
    (which must not exist; the caller renames it into place). Returns the summary.json document."""
    from megatron_moe_ext.analysis import plots
    from megatron_moe_ext.analysis.dynamics import chance_saturation, dynamics_curves, dynamics_json
    from megatron_moe_ext.analysis.summary import summarize_trace

    summaries = {it: summarize_trace(d, progress=progress) for it, d in trace_dirs.items()}
    points = dynamics_curves(summaries, trace_dirs, final_iteration=final_iteration,
                             tokens_per_iteration=tokens_per_iteration)
    # k / N over the router's N + M outputs; none for variable experts per token (no fixed k).
    chance = {l.layer: None if l.variable else chance_saturation(min(l.top_k, l.num_experts + l.null_experts),
                                                                 l.num_experts + l.null_experts)
              for l in summaries[final_iteration].layers}
    doc = {"format": "megatron_moe_ext.dynamics_report", "version": 1, "run": run,
           "num_tokens": summaries[final_iteration].num_tokens,
           "dynamics": dynamics_json(points, final_iteration=final_iteration,
                                     tokens_per_iteration=tokens_per_iteration, chance=chance),
           "checkpoints": {str(it): {**s.to_json(), "trace_dir": f"traces/iter_{it:07d}"}
                           for it, s in summaries.items()}}
    os.makedirs(os.path.join(out_dir, os.path.dirname(FIGURE)))
    plots.plot_dynamics(doc["dynamics"], os.path.join(out_dir, FIGURE))
    with open(os.path.join(out_dir, SUMMARY_FILE), "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
    with open(os.path.join(out_dir, REPORT_FILE), "w") as f:
        f.write(_markdown(doc))
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``megatron-moe-ext dynamics``; returns 0, or exits with argparse's usage error on bad input."""
    from megatron_moe_ext.analysis.capture import CapturePlan
    from megatron_moe_ext.analysis.checkpoint_model import check_layout, routed_layers
    from megatron_moe_ext.analysis.cli import _check_out, _run_capture
    from megatron_moe_ext.analysis.token_windows import default_sources, load_token_windows
    from megatron_moe_ext.training.train import default_cache_dir

    parser = _parser()
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        out = _check_out(ns.out)
        if ns.micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size {ns.micro_batch_size} must be >= 1")
        plan = checkpoint_plan(ns.run, ns.iterations)
        final = check_same_model(plan)
        check_layout(final, tp=ns.tp, ep=ns.ep, world_size=ns.nproc)
        if not routed_layers(final):
            raise ValueError(f"--run {ns.run}: the model has no MoE layers: nothing routes; fix: an MoE run")
        cache = os.path.join(ns.cache_dir or default_cache_dir(), "data")
        sources, names = (ns.data, None) if ns.data else default_sources(cache)
        windows = load_token_windows(sources, seq_length=final.seq_length, max_tokens=ns.max_tokens,
                                     cache_dir=cache, labels_file=ns.labels_file, names=names)
    except ValueError as err:
        parser.error(str(err))
    if ns.dry_run:
        for iteration, iter_dir, is_final in plan:
            print(f"iteration {iteration}: {iter_dir}{' (final)' if is_final else ''}")
        print(f"{windows.tokens_WS.shape[0]} windows of {final.seq_length} tokens; {ns.nproc} ranks (TP {ns.tp}, "
              f"EP {ns.ep}); report: {out}")
        return 0
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=os.path.dirname(out))
    try:
        windows_file = os.path.join(work, "windows.npz")
        windows.save(windows_file)
        trace_dirs, plan_paths = {}, []
        for iteration, iter_dir, _ in plan:
            name = f"iter_{iteration:07d}"
            trace_dirs[iteration] = os.path.join(work, "traces", name)
            capture_plan = CapturePlan(
                iter_dir=iter_dir, windows_file=windows_file, trace_dir=trace_dirs[iteration], iteration=iteration,
                tensor_parallel=ns.tp, expert_parallel=ns.ep, micro_batch_size=ns.micro_batch_size, seed=ns.seed,
                progress=ns.progress, name=name)
            plan_paths.append(os.path.join(work, f"plan-{iteration}.json"))
            capture_plan.save(plan_paths[-1])
        _run_capture(plan_paths, ns.nproc)
        report_tmp = os.path.join(work, "report")
        os.mkdir(report_tmp)
        write_dynamics_report(trace_dirs, report_tmp, run=os.path.abspath(ns.run), final_iteration=plan[-1][0],
                              tokens_per_iteration=final.global_batch_size * final.seq_length,
                              progress=ns.progress)
        os.replace(os.path.join(work, "traces"), os.path.join(report_tmp, "traces"))
        if os.path.lexists(out):
            raise FileExistsError(f"--out {out} appeared while the report was built; nothing was overwritten")
        os.replace(report_tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"report: {os.path.join(out, REPORT_FILE)}")
    return 0
