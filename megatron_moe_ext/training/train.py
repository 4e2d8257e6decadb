"""``megatron-moe-ext train``: Megatron's own pretraining loop, on CPU or GPU, with our model specs.

The launcher half runs once, before any process group exists: it validates the parallel layout,
the data and the checkpoint directory (so bad input fails once, clearly, on "rank 0" before any
rank starts), prepares data (the embedded default corpus, or raw text files), and then starts the
ranks: with torchrun on GPU; on CPU as ``--nproc`` gloo ranks forked from the launcher, which has
already imported megatron (``runtime/local_ranks.py``). Under an existing launcher
(``RANK`` set, e.g. torchrun or SLURM), it runs the rank half directly.

The rank half (``rank_main``) is ``megatron.training.pretrain`` with Megatron's flags unchanged, a
GPT config built by Megatron's own ``gpt_config_from_args``, our forward step and dataset provider,
and, without Transformer Engine, the local spec with sequence-parallel-capable norms.

With no ``--data-path`` (and no ``--mock-data``) it trains the embedded default: a tiny MoE GPT on
the Python standard library's sources, byte-level, EP=2 with the alltoall dispatcher.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

import torch

from megatron_moe_ext.runtime.rank import CPU_ARGS
from megatron_moe_ext.training import data as data_lib
from megatron_moe_ext.training.preflight import ALLOW_FRESH_START_FLAG
from megatron_moe_ext.training.rank_entry import add_train_args

# The embedded default model: small enough for 2 CPU cores, big enough that the loss visibly falls.
DEFAULT_MODEL_ARGS: tuple[str, ...] = (
    "--num-layers", "2",
    "--hidden-size", "64",
    "--ffn-hidden-size", "256",
    "--moe-ffn-hidden-size", "256",  # = the FFN size (Megatron's fallback), stated so it does not warn
    "--num-attention-heads", "4",
    "--seq-length", "128",
    "--max-position-embeddings", "128",
    "--position-embedding-type", "rope",
    "--normalization", "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--hidden-dropout", "0",
    "--attention-dropout", "0",
    "--num-experts", "4",
    "--moe-router-topk", "2",
    "--moe-token-dispatcher-type", "alltoall",
    "--moe-router-load-balancing-type", "aux_loss",
    "--moe-aux-loss-coeff", "1e-2",
    "--moe-z-loss-coeff", "1e-3",
    "--expert-model-parallel-size", "2",
    "--micro-batch-size", "8",
    "--global-batch-size", "16",
    "--train-iters", "300",
    "--lr", "5e-3",
    "--min-lr", "5e-4",
    "--lr-decay-style", "cosine",
    "--lr-warmup-iters", "10",  # fit to short runs by _fit_default_warmup
    "--weight-decay", "0.01",
    "--clip-grad", "1.0",
    "--use-distributed-optimizer",
    "--seed", "1234",
    "--split", "98,1,1",
    "--eval-interval", "100",
    "--eval-iters", "4",
    "--log-interval", "1",
    "--log-throughput",
    "--save-interval", "300",
    "--ckpt-format", "torch_dist",
    "--tokenizer-type", "NullTokenizer",
    "--vocab-size", str(data_lib.VOCAB_SIZE),
)
DEFAULT_SAVE_DIR = os.path.join("runs", "demo", "checkpoints")


def default_cache_dir() -> str:
    """Where built datasets are cached (``$MEGATRON_MOE_EXT_CACHE`` or ~/.cache/megatron_moe_ext)."""
    return os.environ.get("MEGATRON_MOE_EXT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron_moe_ext"
    )


def _launcher_parser() -> argparse.ArgumentParser:
    from megatron_moe_ext.integration.flag_help import FeatureHelpAction

    parser = argparse.ArgumentParser(
        prog="megatron-moe-ext train",
        description="Megatron pretraining with megatron-moe-ext. Every Megatron flag is accepted unchanged.",
        allow_abbrev=False,
        add_help=False,
    )
    parser.add_argument("-h", "--help", action=FeatureHelpAction)
    parser.add_argument("--nproc", type=int, default=None, help="ranks to start on this machine (CPU default 2; GPU: one per GPU)")
    parser.add_argument("--cache-dir", default=None, help="dataset cache (default $MEGATRON_MOE_EXT_CACHE or ~/.cache/megatron_moe_ext)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the rank command, start nothing")
    parser.add_argument(
        ALLOW_FRESH_START_FLAG, action="store_true",
        help="let a --load directory without a checkpoint start from scratch (Megatron's behaviour), not an error",
    )
    parser.add_argument(
        "--routing-checkpoints", default=None, metavar="ITERS",
        help="also save the model alone (no optimizer) at these iterations, e.g. 0,10,50, to <--save>/routing "
             "(torch_dist) for `megatron-moe-ext dynamics` (training/routing_checkpoints.py)",
    )
    return parser


def _flag(argv: Sequence[str], name: str, default: str | None = None) -> str | None:
    """Last value of ``--name VALUE`` or ``--name=VALUE`` in argv (argparse's last-wins rule)."""
    value = default
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _flag_values(argv: Sequence[str], name: str) -> list[str] | None:
    """Values of a nargs='*' flag (up to the next ``--flag``), last occurrence wins."""
    values = None
    for i, arg in enumerate(argv):
        if arg == name:
            values = []
            for item in argv[i + 1 :]:
                if item.startswith("--"):
                    break
                values.append(item)
    return values


def _int_flag(argv: Sequence[str], name: str, default: int) -> int:
    value = _flag(argv, name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} {value!r} is not an integer") from None


def validate_layout(argv: Sequence[str], world_size: int) -> None:
    """Raise ValueError if the parallel sizes in ``argv`` cannot tile ``world_size`` ranks."""
    tp = _int_flag(argv, "--tensor-model-parallel-size", 1)
    pp = _int_flag(argv, "--pipeline-model-parallel-size", 1)
    cp = _int_flag(argv, "--context-parallel-size", 1)
    ep = _int_flag(argv, "--expert-model-parallel-size", 1)
    etp = _int_flag(argv, "--expert-tensor-parallel-size", tp)
    for name, value in (("tensor", tp), ("pipeline", pp), ("context", cp), ("expert", ep), ("expert-tensor", etp)):
        if value < 1:
            raise ValueError(f"--{name}-model-parallel-size={value} must be >= 1")
    if world_size % (tp * pp * cp):
        raise ValueError(
            f"world size {world_size} is not divisible by TP*PP*CP = {tp}*{pp}*{cp} = {tp * pp * cp}; "
            f"fix: use --nproc a multiple of {tp * pp * cp} or smaller parallel sizes"
        )
    if world_size % (etp * ep * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by ETP*EP*PP = {etp}*{ep}*{pp} = {etp * ep * pp}; "
            f"fix: use --nproc a multiple of {etp * ep * pp} or a smaller --expert-model-parallel-size"
        )
    experts = _flag(argv, "--num-experts")
    if experts is not None and int(experts) % ep:
        raise ValueError(
            f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}; "
            f"fix: choose a number of experts that is a multiple of {ep}"
        )


def check_save_dir(path: str) -> None:
    """Raise ValueError unless ``path`` can be created and written (checked before training)."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ValueError(
            f"checkpoint directory --save {path!r} is not writable ({err.strerror or err}); "
            "fix: pass a --save directory you can write to"
        ) from None


# Default sizing flags that a user's granularity flags replace (instead of contradicting them).
_SIZING_FLAGS = {"--num-experts", "--moe-router-topk", "--moe-ffn-hidden-size"}
_GRANULARITY_FLAGS = {"--moe-granularity", "--moe-expansion-rate", "--moe-base-topk"}
# Default flags a router type does not take (expert choice is balanced by construction: no aux loss).
_ROUTER_DROPS = {"expert_choice": {"--moe-router-load-balancing-type", "--moe-aux-loss-coeff"}}


def _without(argv: Sequence[str], names: set[str]) -> list[str]:
    """``argv`` without the ``--name VALUE`` pairs of ``names``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif arg.split("=", 1)[0] not in names:
            out.append(arg)
    return out


_WARMUP_FLAGS = {"--lr-warmup-iters", "--lr-warmup-fraction", "--lr-warmup-samples"}


def _fit_default_warmup(defaults: list[str], user_argv: Sequence[str]) -> list[str]:
    """The embedded default's 10 warm-up iterations, shortened to ``decay - 1`` for a shorter run.

    Megatron's scheduler asserts warm-up < decay iterations (``--lr-decay-iters``, else ``--train-iters``), so
    ``train --train-iters 5`` would die in the ranks; a warm-up the user set is left alone (and checked by
    ``preflight.check_lr_schedule``)."""
    if any(a.split("=", 1)[0] in _WARMUP_FLAGS for a in user_argv):
        return defaults
    decay = _flag(user_argv, "--lr-decay-iters") or _flag(user_argv, "--train-iters")
    try:
        decay_iters = int(decay) if decay is not None else None
    except ValueError:
        return defaults  # Megatron's parser names the bad value
    if decay_iters is None or decay_iters > 10:
        return defaults
    return [*_without(defaults, {"--lr-warmup-iters"}), "--lr-warmup-iters", str(max(0, decay_iters - 1))]


def prepare_argv(user_argv: Sequence[str], *, cache_dir: str, cpu: bool) -> list[str]:
    """The full Megatron argv the ranks run: CPU flags, the embedded default if no data was
    given, then the user's flags (last wins, so the user overrides any default)."""
    user_argv = list(user_argv)
    argv: list[str] = list(CPU_ARGS) if cpu else []
    data_path = _flag_values(user_argv, "--data-path")
    per_split = any(_flag_values(user_argv, f) for f in ("--train-data-path", "--valid-data-path", "--test-data-path"))
    mock = "--mock-data" in user_argv
    if not data_path and not per_split and not mock:
        prefix = data_lib.build_default_dataset(os.path.join(cache_dir, "data"))
        defaults = list(DEFAULT_MODEL_ARGS)
        if any(a.split("=", 1)[0] in _GRANULARITY_FLAGS for a in user_argv):
            defaults = _without(defaults, _SIZING_FLAGS)
        router = _flag(user_argv, "--moe-router-type")
        if router in _ROUTER_DROPS:
            defaults = _without(defaults, _ROUTER_DROPS[router])
        argv += _fit_default_warmup(defaults, user_argv)
        argv += ["--data-path", prefix, "--data-cache-path", os.path.join(cache_dir, "index")]
        if _flag(user_argv, "--save") is None:
            argv += ["--save", DEFAULT_SAVE_DIR]
    elif data_path:
        resolved = data_lib.resolve_data_paths(data_path, os.path.join(cache_dir, "data"))
        # Replace the user's --data-path values in place with the resolved prefixes.
        i = max(i for i, a in enumerate(user_argv) if a == "--data-path")
        user_argv = user_argv[: i + 1] + resolved + user_argv[i + 1 + len(data_path) :]
        if resolved != data_path and _flag(user_argv, "--tokenizer-type") is None:
            argv += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(data_lib.VOCAB_SIZE)]
    return argv + user_argv


def rank_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """torchrun command starting ``nproc`` local ranks of ``rank_main``."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={nproc}",
        # every rank's lines, prefixed with its rank, on the console (as local CPU ranks print them)
        "--tee", "3", "--log-line-prefix-template", "[rank${rank}] ",
        "-m", "megatron_moe_ext.training.rank_entry", *argv,
    ]


def start_ranks(
    parser: argparse.ArgumentParser,
    ours: argparse.Namespace,
    megatron_argv: Sequence[str],
    *,
    command: Callable[[int, list[str]], list[str]],
    entry: Callable[[list[str]], object],
    entry_prefix: Sequence[str] = (),
    extra_args_provider: Callable[[argparse.ArgumentParser], argparse.ArgumentParser] | None = add_train_args,
    routing_checkpoints: str | None = None,
) -> int:
    """The launcher half shared by ``train`` and ``launch``: validate everything once, then start the ranks.

    Builds the full argv (CPU flags, embedded default), checks the layout, parses it with Megatron's parser
    and our flags and derivation, checks --save; any ValueError is argparse's usage error (exit 2) before a
    rank starts. ``--dry-run`` prints ``command(nproc, argv)`` (the torchrun equivalent). On CPU the ranks
    are forked from this process (``entry(entry_prefix + argv)``), on GPU torchrun runs ``command``.
    ``routing_checkpoints`` ("0,10,50") is checked against the run (the entry and command carry it to the ranks).
    """
    cpu = not torch.cuda.is_available()
    nproc = ours.nproc if ours.nproc is not None else (2 if cpu else torch.cuda.device_count())
    if nproc < 1:
        parser.error(f"--nproc {nproc} must be >= 1")
    cache_dir = ours.cache_dir or default_cache_dir()
    # Ours, not Megatron's: `launch`'s parser passes it through, so it is taken out here for both entries.
    allow_fresh_start = bool(getattr(ours, "ext_allow_fresh_start", False)) or ALLOW_FRESH_START_FLAG in megatron_argv
    megatron_argv = [a for a in megatron_argv if a != ALLOW_FRESH_START_FLAG]
    try:
        full_argv = prepare_argv(megatron_argv, cache_dir=cache_dir, cpu=cpu)
        validate_layout(full_argv, nproc)
        # Megatron's parser plus our flags and derivation: unknown or contradictory flags fail
        # here, once, before any process group exists.
        from megatron_moe_ext.args import parse_megatron_args
        from megatron_moe_ext.checkpoint.torch_dist import check_load_checkpoint
        from megatron_moe_ext.training.preflight import preflight

        parsed = parse_megatron_args(full_argv, extra_args_provider=extra_args_provider, validate=False)
        # What the ranks would reject (Megatron's validate_args, the LR schedule, empty data splits, a --load
        # without a checkpoint), rejected here: the same for a real start and --dry-run.
        for note in preflight(parsed, nproc=nproc, cpu=cpu, allow_fresh_start=allow_fresh_start):
            print(f"{parser.prog}: warning: {note}", file=sys.stderr)
        check_load_checkpoint(parsed)  # --load: every file whole, the same architecture (checkpoint/torch_dist.py)
        save = _flag(full_argv, "--save")
        if save is not None:
            check_save_dir(save)
        if routing_checkpoints is not None:
            from megatron_moe_ext.training import routing_checkpoints as rc

            iterations = rc.parse_iterations(routing_checkpoints)
            rc.check_routing_checkpoints(iterations, train_iters=parsed.train_iters, save=parsed.save,
                                         ckpt_format=parsed.ckpt_format,
                                         pipeline=parsed.pipeline_model_parallel_size,
                                         virtual_pipeline=(parsed.num_layers_per_virtual_pipeline_stage
                                                           or parsed.num_virtual_stages_per_pipeline_rank))
    except ValueError as err:
        parser.error(str(err))
    rank_cmd = command(nproc, full_argv)
    if ours.dry_run:
        print(" ".join(rank_cmd))
        return 0
    if cpu:
        # All ranks are local gloo processes: fork them from this already-imported launcher rather than
        # let torchrun start fresh interpreters that import megatron again (runtime/local_ranks.py).
        from megatron_moe_ext.runtime.local_ranks import start_local_ranks
        from megatron_moe_ext.training.rank_entry import RANK_MODULES

        return start_local_ranks(entry, [*entry_prefix, *full_argv], nproc, preload=RANK_MODULES)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # torchrun in the run's own process group: SIGINT/SIGTERM here stop it (and it its workers), and a dead
    # launcher takes it down (runtime/run_group.py).
    from megatron_moe_ext.runtime.run_group import run_command

    return run_command(rank_cmd, env=env)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``megatron-moe-ext train``; returns the ranks' exit code."""
    from megatron_moe_ext.training.rank_entry import rank_main

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _launcher_parser()
    ours, megatron_argv = parser.parse_known_args(argv)
    if ours.routing_checkpoints is None:
        if "RANK" in os.environ:  # already one rank of a torchrun/SLURM job
            rank_main(megatron_argv)
            return 0
        return start_ranks(parser, ours, megatron_argv, command=rank_command, entry=rank_main)
    from megatron_moe_ext.training import routing_checkpoints as rc

    try:
        prefix = [rc.ITERATIONS_FLAG, ",".join(map(str, rc.parse_iterations(ours.routing_checkpoints)))]
    except ValueError as err:
        parser.error(str(err))
    if "RANK" in os.environ:
        rc.rank_main([*prefix, *megatron_argv])
        return 0

    def command(nproc: int, argv: list[str]) -> list[str]:  # the same ranks, their forward step wrapped
        cmd = rank_command(nproc, [])
        return [*cmd[:-1], "megatron_moe_ext.training.routing_checkpoints", *prefix, *argv]

    return start_ranks(parser, ours, megatron_argv, command=command, entry=rc.rank_main, entry_prefix=prefix,
                       routing_checkpoints=ours.routing_checkpoints)
