"""Everything Megatron would reject, rejected by the launcher before any rank starts (issue #19, item 2).

``train``, ``launch`` and ``--dry-run`` share ``training.train.start_ranks``, which parses the final argument
list once (Megatron's parser, our flags and derivation) and then calls ``preflight``:

* the cases we recognise, each with the flags and a fix: a missing ``--micro-batch-size`` (or other model
  size flag) once ``--data-path``/``--mock-data`` drops the embedded default model; a global batch that the
  micro-batch times the data-parallel size does not divide (Megatron's microbatch calculator, inside the
  ranks); ``--seq-length`` over ``--max-position-embeddings``; heads not divisible by TP (TransformerConfig,
  inside the ranks); ``--transformer-impl transformer_engine`` without Transformer Engine or on CPU;
* Megatron's own ``validate_args``, on a copy of the arguments with ``world_size``/``rank`` as torchrun
  would set them (``WORLD_SIZE=nproc``, ``RANK=0``; the environment is restored after) and its argument
  print silenced: no process group, no Megatron globals, so the later fork is unaffected. On CPU it sees what
  the CPU runtime gives a rank (``CUDA_DEVICE_MAX_CONNECTIONS=1``, the table's ``cpu-device-arch`` row), only
  while it runs. Whatever it still rejects becomes a usage error quoting Megatron's message (or, for a bare
  assert, the failing line);
* the model config the ranks build (``TransformerConfig.__post_init__`` and ours), from the validated copy;
* the LR scheduler's constraints (``OptimizerParamScheduler.__init__`` asserts ``lr_decay_steps > 0`` and
  ``lr_warmup_steps < lr_decay_steps``, in the ranks, as a bare AssertionError);
* the data: a split with nonzero weight that gets no documents makes Megatron's GPTDataset loop forever
  (``_get_num_epochs`` adds zero tokens per epoch), so it is refused with the counts; a split smaller than
  one sequence is a warning;
* ``--load`` that does not exist or holds no checkpoint: refused unless ``--ext-allow-fresh-start``.

Every check raises ``ValueError`` (the launcher turns it into argparse's usage error, exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import traceback
import warnings

from megatron_moe_ext.training import data as data_lib

ALLOW_FRESH_START_FLAG = "--ext-allow-fresh-start"
_SPLIT_NAMES = ("train", "validation", "test")


def preflight(args: argparse.Namespace, *, nproc: int, cpu: bool, allow_fresh_start: bool = False) -> list[str]:
    """Raise ValueError for anything the ranks would reject; returns warnings (text) for what they accept.

    ``args`` is the launcher's parsed namespace (``parse_megatron_args(..., validate=False)``); it is not
    modified."""
    if getattr(args, "use_checkpoint_args", False) or getattr(args, "yaml_cfg", None) is not None:
        # The ranks take the model flags from the checkpoint / the YAML file before validating: only --load here.
        return [n for n in [check_load(args, allow_fresh_start=allow_fresh_start)] if n]
    check_known_cases(args, nproc=nproc, cpu=cpu)
    validated = validate_like_a_rank(args, nproc=nproc, cpu=cpu)
    check_transformer_config(validated, nproc=nproc, cpu=cpu)
    check_lr_schedule(validated)
    note = check_load(validated, allow_fresh_start=allow_fresh_start)
    return [n for n in [note] if n] + check_data_splits(validated)


# -- the cases we recognise ----------------------------------------------------------------------
_MODEL_SIZE_FLAGS = ("micro_batch_size", "num_layers", "hidden_size", "num_attention_heads", "seq_length",
                     "max_position_embeddings")


def _flag_name(attr: str) -> str:
    return "--" + attr.replace("_", "-")


def check_known_cases(args: argparse.Namespace, *, nproc: int, cpu: bool) -> None:
    """The rejections we can name precisely, before Megatron's generic assertions."""
    missing = [_flag_name(a) for a in _MODEL_SIZE_FLAGS if getattr(args, a, None) is None]
    if getattr(args, "seq_length", None) is None and getattr(args, "encoder_seq_length", None) is not None:
        missing.remove("--seq-length")
    if missing:
        example = {"--micro-batch-size": "8", "--num-layers": "2", "--hidden-size": "64",
                   "--num-attention-heads": "4", "--seq-length": "128", "--max-position-embeddings": "128"}
        raise ValueError(
            f"{', '.join(missing)} not given: the embedded default model (which sets them) is used only without "
            f"--data-path/--mock-data; fix: add {' '.join(f'{m} {example[m]}' for m in missing)} (for example)"
        )
    if args.transformer_impl == "transformer_engine":
        from megatron_moe_ext._compat import HAVE_TE

        if cpu or not HAVE_TE:
            why = "on CPU (Transformer Engine needs CUDA)" if cpu else "and Transformer Engine is not installed"
            raise ValueError(
                f"--transformer-impl transformer_engine {why}; fix: --transformer-impl local, or drop the flag "
                "(the CPU launcher adds --transformer-impl local)"
            )
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    dp = nproc // (tp * pp * cp)
    mbs, gbs = args.micro_batch_size, args.global_batch_size
    if mbs < 1:
        raise ValueError(f"--micro-batch-size {mbs} must be >= 1; fix: e.g. --micro-batch-size 1")
    if gbs is not None and (gbs < 1 or gbs % (mbs * dp)):
        step = mbs * dp
        up = max(step, -(-gbs // step) * step)
        divisors = [m for m in range(1, mbs + 1) if gbs > 0 and gbs % (m * dp) == 0]
        alt = f", or --micro-batch-size {divisors[-1]}" if divisors else ""
        raise ValueError(
            f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {mbs} x data-parallel size {dp} "
            f"({nproc} ranks / TP*PP*CP {tp * pp * cp}) = {step}; fix: --global-batch-size {up}{alt}"
        )
    seq = args.seq_length if args.seq_length is not None else args.encoder_seq_length
    if seq is not None and args.max_position_embeddings < seq:
        raise ValueError(
            f"--seq-length {seq} exceeds --max-position-embeddings {args.max_position_embeddings}; fix: "
            f"--max-position-embeddings {seq}, or --seq-length {args.max_position_embeddings}"
        )
    if args.save is not None and args.save_interval is None:
        raise ValueError(f"--save {args.save} needs --save-interval (Megatron asserts it); fix: e.g. --save-interval "
                         f"{args.train_iters or 1000}")
    if args.lr is not None and args.min_lr > args.lr:
        raise ValueError(f"--min-lr {args.min_lr} exceeds --lr {args.lr}; fix: --min-lr {args.lr} or less")
    heads = args.num_attention_heads
    if heads % tp:
        raise ValueError(
            f"--num-attention-heads {heads} is not divisible by --tensor-model-parallel-size {tp}; fix: a "
            f"--tensor-model-parallel-size that divides {heads}, or a multiple of {tp} heads"
        )
    groups = args.num_query_groups if args.group_query_attention else None
    if groups is not None and groups % tp:
        raise ValueError(
            f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size {tp}; fix: a "
            f"--tensor-model-parallel-size that divides {groups}, or a multiple of {tp} query groups"
        )


# -- Megatron's validate_args, as rank 0 would run it ---------------------------------------------
@contextlib.contextmanager
def _rank_env(nproc: int, *, cpu: bool):
    """The environment of rank 0: torchrun's WORLD_SIZE and RANK, and on CPU the CUDA_DEVICE_MAX_CONNECTIONS=1
    that the CPU runtime sets (``runtime/cpu.py``; validate_args demands it under TP/CP > 1). Restored after."""
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "CUDA_DEVICE_MAX_CONNECTIONS")}
    os.environ.update(WORLD_SIZE=str(nproc), RANK="0")
    if cpu:
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _as_rank_zero(nproc: int, *, cpu: bool, out: io.StringIO):
    """What a rank's argument checks see, for the duration of one check in the launcher: the rank environment,
    stdout captured in ``out`` and warnings silenced (the ranks print the same arguments and warnings again; once
    there is enough) and, without CUDA, the integration table's cpu-device-arch row (the ranks install it with the
    CPU runtime, which the launcher does not enable: validate_args asks the arch of cuda:0 under TP/CP > 1)."""
    from megatron_moe_ext.integration import installer

    with _rank_env(nproc, cpu=cpu), contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with installer.temporarily(("cpu-device-arch",) if cpu else ()):
            yield


def _quoted(err: BaseException) -> str:
    """The error's message; many of Megatron's asserts have none, so then the failing line."""
    frames = traceback.extract_tb(err.__traceback__)
    return str(err) or (frames[-1].line if frames and frames[-1].line else type(err).__name__)


def validate_like_a_rank(args: argparse.Namespace, *, nproc: int, cpu: bool) -> argparse.Namespace:
    """Megatron's ``validate_args`` on a copy of ``args`` as rank 0 of ``nproc`` sees it; returns the copy.

    ``validate_args`` reads the world size from ``args`` (``parse_args`` took it from the environment) and
    only fills in ``args``: no process group, no globals (``set_global_variables`` is not called)."""
    from megatron.training import arguments

    validated = copy.deepcopy(args)
    validated.world_size, validated.rank = nproc, 0
    out = io.StringIO()
    try:
        with _as_rank_zero(nproc, cpu=cpu, out=out):
            arguments.validate_args(validated, {})
    except SystemExit:
        raise ValueError(f"Megatron's validate_args exited: {out.getvalue().strip()[-500:]}") from None
    except (AssertionError, ValueError, RuntimeError, TypeError, KeyError) as err:
        raise ValueError(
            f"Megatron's validate_args rejects these flags: {_quoted(err)}; fix: change the flags it names "
            "(megatron/training/arguments.py validate_args)"
        ) from None
    return validated


# -- the model config (megatron/core/transformer/transformer_config.py) ---------------------------
def check_transformer_config(args: argparse.Namespace, *, nproc: int, cpu: bool) -> None:
    """The ranks' config (``args.config_from_args``: Megatron's ``core_transformer_config_from_args`` with our
    ``MoEExtConfig``), built once here from the validated copy: ``TransformerConfig.__post_init__`` rejects
    combinations ``validate_args`` lets through (for example ``--moe-router-topk 1`` with the softmax score
    function needs ``--moe-router-pre-softmax``), and our config's own checks run there too. Building it runs no
    tensor op (the launcher must not start torch's thread pool before forking) and touches no process group."""
    from megatron_moe_ext.args import config_from_args

    try:
        with _as_rank_zero(nproc, cpu=cpu, out=io.StringIO()):
            config_from_args(copy.deepcopy(args))
    except (AssertionError, ValueError) as err:
        message = _quoted(err).rstrip(".")
        if "fix:" in message:  # ours: already names the values and the fix
            raise ValueError(message) from None
        if "--moe-router-pre-softmax" in message:
            router = args.moe_router_type
            unused = (f" (the {router} router does not read it: Megatron's config asks for it with every top-1)"
                      if router in ("relu", "expert_choice") else "")
            raise ValueError(f"Megatron's TransformerConfig rejects --moe-router-topk {args.moe_router_topk}: "
                             f"{message}; fix: add --moe-router-pre-softmax{unused}") from None
        raise ValueError(
            f"Megatron's TransformerConfig rejects these flags: {message}; fix: change the flags it names "
            "(megatron/core/transformer/transformer_config.py __post_init__)"
        ) from None


# -- the LR scheduler (megatron/core/optimizer_param_scheduler.py) ---------------------------------
def check_lr_schedule(args: argparse.Namespace) -> None:
    """``OptimizerParamScheduler`` asserts lr_decay_steps > 0 and lr_warmup_steps < lr_decay_steps, with the
    steps computed by ``training.get_optimizer_param_scheduler``; refuse what would trip them."""
    if args.lr is None:
        # float(None) in OptimizerParamScheduler; the embedded default sets --lr, --data-path/--mock-data runs must.
        raise ValueError("--lr not given (the embedded default model sets it, --data-path/--mock-data runs must); "
                         "fix: e.g. --lr 1e-3")
    if args.lr_warmup_init > args.lr:
        raise ValueError(f"--lr-warmup-init {args.lr_warmup_init} exceeds --lr {args.lr}; fix: --lr-warmup-init 0")
    if args.train_iters:
        decay, decay_flag = (args.lr_decay_iters, "--lr-decay-iters") if args.lr_decay_iters is not None else (
            args.train_iters, "--train-iters")
        if decay <= 0:
            raise ValueError(f"{decay_flag} {decay} must be > 0 for the LR schedule; fix: {decay_flag} 1 or more")
        if args.lr_warmup_fraction is not None:
            if args.lr_warmup_fraction >= 1:
                raise ValueError(
                    f"--lr-warmup-fraction {args.lr_warmup_fraction} must be < 1 (warm-up shorter than the decay of "
                    f"{decay} iterations, {decay_flag}); fix: e.g. --lr-warmup-fraction 0.1"
                )
        elif args.lr_warmup_iters >= decay:
            raise ValueError(
                f"--lr-warmup-iters {args.lr_warmup_iters} must be less than the {decay} iterations of the LR decay "
                f"({decay_flag} {decay}; Megatron's scheduler asserts warm-up < decay); fix: --lr-warmup-iters "
                f"{decay - 1} or less, or {decay_flag} {args.lr_warmup_iters + 1} or more"
            )
        if args.lr_decay_style == "WSD" and args.lr_wsd_decay_iters is None:
            raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters; fix: e.g. --lr-wsd-decay-iters "
                             f"{max(1, decay // 10)}")
    elif args.train_samples:
        decay = args.lr_decay_samples if args.lr_decay_samples is not None else args.train_samples
        if args.lr_warmup_fraction is None and args.lr_warmup_samples >= decay:
            raise ValueError(
                f"--lr-warmup-samples {args.lr_warmup_samples} must be less than the {decay} samples of the LR "
                f"decay; fix: --lr-warmup-samples {decay - 1} or less"
            )
    else:
        raise ValueError("neither --train-iters nor --train-samples is given; fix: e.g. --train-iters 100")


# -- --load ----------------------------------------------------------------------------------------
def check_load(args: argparse.Namespace, *, allow_fresh_start: bool) -> str | None:
    """Megatron starts from scratch, with a warning lost in the log, when --load holds no checkpoint
    (no ``latest_checkpointed_iteration.txt``); we refuse that unless asked to allow it: by
    ``--ext-allow-fresh-start``, or by the auto-resume idiom ``--save D --load D`` (the same directory: resume
    when a checkpoint is there, start when not, as cluster jobs that requeue themselves do), which returns a
    notice instead."""
    load = args.load
    if load is None or allow_fresh_start:
        return None
    fix = f"fix: pass the directory that --save wrote, or add {ALLOW_FRESH_START_FLAG} to start from scratch"
    has_tracker = os.path.isfile(os.path.join(load, "latest_checkpointed_iteration.txt"))
    save = getattr(args, "save", None)
    if not has_tracker and save is not None and os.path.realpath(save) == os.path.realpath(load):
        return (f"--load {load!r} is also --save and holds no checkpoint yet: starting from scratch "
                "(the auto-resume idiom; a later start resumes from what this run saves)")
    if not os.path.isdir(load):
        raise ValueError(f"--load {load!r} does not exist; {fix}")
    if has_tracker:
        return None
    iters = sorted(name for name in os.listdir(load) if name.startswith("iter_"))
    if getattr(args, "ckpt_step", None) is not None and iters:
        return None  # --ckpt-step N reads iter_N without the tracker (checkpoint/torch_dist.py checks that it exists)
    found = (f"it has {', '.join(iters[:3])}{' ...' if len(iters) > 3 else ''} but no latest_checkpointed_iteration.txt"
             if iters else "no latest_checkpointed_iteration.txt and no iter_* directory")
    raise ValueError(f"--load {load!r} holds no checkpoint Megatron would load ({found}); {fix}")


# -- data ------------------------------------------------------------------------------------------
def split_document_counts(num_documents: int, split: str) -> list[int | None]:
    """Documents (sequences) per split that Megatron's builder gives a dataset of ``num_documents``: the split
    string normalised and turned into book-ends (blended_megatron_dataset_config), each range
    ``round(begin * N) .. round(end * N)`` (blended_megatron_dataset_builder); None for a zero-weight split."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    counts: list[int | None] = []
    for bookend in convert_split_vector_to_split_matrix(parse_and_normalize_split(split)):
        if bookend is None:
            counts.append(None)
        else:
            counts.append(int(round(bookend[1] * float(num_documents))) - int(round(bookend[0] * float(num_documents))))
    return counts


def check_data_splits(args: argparse.Namespace) -> list[str]:
    """Refuse a nonzero-weight split with no documents (Megatron would loop forever building its index);
    warn when a split holds less than one sequence of tokens. Returns the warnings."""
    if getattr(args, "mock_data", False) or not args.data_path:
        return []
    from megatron.core.datasets.utils import get_blend_from_list

    prefixes, _ = get_blend_from_list(args.data_path)
    split = args.split or "969, 30, 1"
    needed = args.seq_length + 1
    notes = []
    for prefix in prefixes:
        lengths = data_lib.sequence_lengths(prefix)
        counts = split_document_counts(len(lengths), split)
        begin = 0
        for name, count in zip(_SPLIT_NAMES, counts):
            if count is None:
                continue
            if count == 0:
                per_split = ", ".join(f"{n} {c or 0}" for n, c in zip(_SPLIT_NAMES, counts))
                raise ValueError(
                    f"data {prefix!r} has {len(lengths)} document(s) (each raw text file is one), and --split {split} "
                    f"gives the {name} split 0 of them ({per_split}); "
                    "Megatron would loop forever building its index; fix: --split 100,0,0 --eval-iters 0 (train only), "
                    "or more documents (e.g. more text files)"
                )
            tokens = int(lengths[begin : begin + count].sum())
            if tokens < needed:
                notes.append(
                    f"the {name} split of {prefix!r} has {tokens} tokens in {count} document(s), less than one "
                    f"sequence (--seq-length {args.seq_length} + 1): every sample repeats it"
                )
            begin += count
    return notes
