"""A Megatron torch_dist checkpoint read into whole (global) tensors, without building a model.

torch_dist stores every model tensor once, under its *sharded key*, at its global shape: TP shards, EP expert
ranks and pipeline stages were written as pieces of one global tensor, and PyTorch's distributed checkpoint
reader reassembles any piece layout. So reading needs no process group and no Megatron model, and the result is
the same whatever TP/EP/PP the run used. Two key styles exist and both are normalised here:

- per-layer keys ``decoder.layers.<i>.<name>`` (heterogeneous stacks: our specs with PEER or dense layers);
- stacked keys ``decoder.layers.<name>`` whose leading axis is the (global) layer index (homogeneous stacks).

The *canonical* state of this package is the per-layer form: ``decoder.layers.<i>.<name>`` with 0-based global
``i``, every other key as stored (``embedding.word_embeddings.weight``, ``output_layer.weight``,
``decoder.final_layernorm.weight``). Converters map canonical names; import writes them back through the model's
own sharded state dict. Megatron names worth knowing (local spec, torch_dist):
``…self_attention.linear_qkv.layer_norm_weight`` is the input norm and ``…mlp.linear_fc1.layer_norm_weight`` the
pre-MLP norm (also on MoE and PEER layers); experts are stacked ``…mlp.experts.experts.linear_fc{1,2}.weight``
[E, out, in] with fc1 = [gate_all; up_all] (TP-independent).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import warnings
from collections.abc import Iterator

import torch

TRACKER = "latest_checkpointed_iteration.txt"
_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED_KEY = re.compile(r"^decoder\.layers\.([A-Za-z_].*)$")
# Keys of a training checkpoint that are not model weights (optimizer state may sit under chained_<i>.).
_NON_MODEL_KEY = re.compile(r"^((chained_\d+\.)?optimizer\.|rng_state|rerun_state_machine_state|common_state)")
# Read at most this many bytes of tensors per reader call (bounds the memory of large checkpoints).
_READ_BATCH_BYTES = 1 << 30


def resolve_iteration(checkpoint: str, iteration: int | None = None) -> tuple[str, int | None]:
    """(directory of the checkpoint's iteration, iteration) for a Megatron ``--save`` directory; ValueError naming
    the problem when it is not a torch_dist checkpoint or the iteration is missing. ``release`` checkpoints (what
    conversions write) have iteration None."""
    if not os.path.isdir(checkpoint):
        raise ValueError(f"--checkpoint {checkpoint!r} is not a directory; fix: pass the --save directory of a "
                         f"training run")
    release = False
    if iteration is None:
        tracker = os.path.join(checkpoint, TRACKER)
        if not os.path.isfile(tracker):
            raise ValueError(f"--checkpoint {checkpoint!r} has no {TRACKER}: not a Megatron checkpoint directory "
                             f"(or no save finished); fix: pass the --save directory, or --iteration N")
        with open(tracker) as f:
            text = f.read().strip()
        if text == "release":
            release = True
        elif not text.isdigit():
            raise ValueError(f"{tracker} holds {text!r}, not an iteration number; fix: pass --iteration N")
        else:
            iteration = int(text)
    iter_dir = os.path.join(checkpoint, "release" if release else f"iter_{iteration:07d}")
    if not os.path.isdir(iter_dir):
        found = sorted(d for d in os.listdir(checkpoint) if d.startswith("iter_") or d == "release")
        raise ValueError(f"iteration {iteration} is not in {checkpoint!r} (found: {', '.join(found) or 'none'}); "
                         f"fix: pass one of those with --iteration")
    backend = sharded_backend(iter_dir)
    if backend != "torch_dist":
        raise ValueError(f"{iter_dir} is not a torch_dist checkpoint (metadata.json sharded_backend={backend!r}); "
                         f"fix: train with --ckpt-format torch_dist (Megatron's default)")
    return iter_dir, (None if release else iteration)


def sharded_backend(iter_dir: str) -> str | None:
    """The checkpoint format Megatron recorded in ``iter_dir/metadata.json`` (None when unreadable or absent)."""
    try:
        with open(os.path.join(iter_dir, "metadata.json")) as f:
            return json.load(f).get("sharded_backend")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """Silences torch's notice that a load without a process group runs in one process: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized, "
                                r"assuming the intent is to load in a single process")
        yield


def read_common_state(iter_dir: str) -> dict:
    """The checkpoint's common (non-sharded) state: Megatron's ``args`` namespace, iteration, version."""
    with _single_process():
        return _read_common_state(iter_dir)


def _read_common_state(iter_dir: str) -> dict:
    try:
        from megatron.core.dist_checkpointing.serialization import (
            load_common_state_dict,
        )
    except ImportError:  # megatron-core absent: read the common-state object ourselves
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load

        key = "common_state/shard_0_1"
        state = {key: io.BytesIO()}
        dcp_load(state, storage_reader=FileSystemReader(iter_dir), no_dist=True)
        buffer = state[key]
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)
    return load_common_state_dict(iter_dir)


def read_args(iter_dir: str) -> argparse.Namespace:
    """The training run's Megatron argument namespace (ours included), from the common state."""
    state = read_common_state(iter_dir)
    if "args" not in state:
        raise ValueError(f"{iter_dir} holds no training arguments (saved without megatron.training?); conversion "
                         f"needs them to know the architecture")
    return state["args"]


def model_tensor_shapes(iter_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Stored key -> (global shape, dtype) of every model tensor in the checkpoint (optimizer state excluded)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(iter_dir).read_metadata()
    out = {}
    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata) and not _NON_MODEL_KEY.match(key):
            out[key] = (tuple(meta.size), meta.properties.dtype)
    return out


def _read(iter_dir: str, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> Iterator[tuple[str, torch.Tensor]]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    batch: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> Iterator[tuple[str, torch.Tensor]]:
        with _single_process():
            dcp_load(batch, storage_reader=FileSystemReader(iter_dir), no_dist=True)
        yield from batch.items()

    for key, (shape, dtype) in sorted(shapes.items()):
        batch[key] = torch.empty(shape, dtype=dtype)
        size += batch[key].numel() * batch[key].element_size()
        if size >= _READ_BATCH_BYTES:
            yield from flush()
            batch, size = {}, 0
    if batch:
        yield from flush()


def canonical_items(key: str, tensor: torch.Tensor, num_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, tensor) pairs of one stored key: a stacked key splits into one entry per layer."""
    if _LAYER_KEY.match(key):
        yield key, tensor
        return
    stacked = _STACKED_KEY.match(key)
    if stacked is None:
        yield key, tensor
        return
    if tensor.shape[0] != num_layers:
        raise ValueError(f"stacked key {key!r} has {tensor.shape[0]} layers on its leading axis, the model "
                         f"{num_layers}; the checkpoint does not match its own arguments")
    for i in range(num_layers):
        yield f"decoder.layers.{i}.{stacked.group(1)}", tensor[i].clone()


def read_model_state(iter_dir: str, num_layers: int) -> dict[str, torch.Tensor]:
    """Canonical name -> global tensor for every model tensor of the checkpoint (see the module docstring)."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in _read(iter_dir, model_tensor_shapes(iter_dir)):
        for name, value in canonical_items(key, tensor, num_layers):
            state[name] = value
    return state


def canonical_name(key: str, leading_offset: int) -> str:
    """The canonical name of one stored ``key`` whose piece starts at ``leading_offset`` on the leading axis (a
    model's sharded state dict says both): a stacked key names the layer at that offset."""
    stacked = _STACKED_KEY.match(key)
    return f"decoder.layers.{leading_offset}.{stacked.group(1)}" if stacked is not None else key


# -- integrity and architecture of a checkpoint before --load ---------------------------------------------------
# Megatron flags that fix the shapes of the saved tensors (Megatron's and ours): a --load whose run disagrees
# with its checkpoint on any of them fails deep in a rank with a shape mismatch.
ARCHITECTURE_ARGS: tuple[str, ...] = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "group_query_attention",
    "num_query_groups", "kv_channels",
    "vocab_size", "swiglu", "untie_embeddings_and_output_weights", "add_bias_linear", "position_embedding_type",
    "normalization", "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "moe_router_type", "moe_pk_heads", "moe_pk_key_dim", "moe_peer_num_experts", "moe_peer_layers",
    "moe_peer_heads", "moe_peer_key_dim", "moe_peer_shared_ffn_hidden_size",
)
_RECOPY = ("fix: copy the whole iteration folder again from where it was saved, or --load a checkpoint "
           "directory whose latest iteration is complete (edit its latest_checkpointed_iteration.txt to an "
           "earlier iteration)")


def check_files(iter_dir: str) -> None:
    """ValueError naming every file of a torch_dist iteration folder that is missing, or shorter than the byte
    ranges its ``.metadata`` records (a truncated copy or an interrupted save); reads only the metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata_path = os.path.join(iter_dir, ".metadata")
    if not os.path.isfile(metadata_path):
        raise ValueError(f"{metadata_path} is missing: the save did not finish or the folder was copied "
                         f"incompletely; {_RECOPY}")
    try:
        metadata = FileSystemReader(iter_dir).read_metadata()
    except Exception as err:  # pickle/EOF errors of a damaged file
        raise ValueError(f"{metadata_path} is damaged ({type(err).__name__}: {err}); {_RECOPY}") from None
    needed: dict[str, int] = {}  # file -> the end of the last byte range the metadata records in it
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, end in sorted(needed.items()):
        path = os.path.join(iter_dir, name)
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
        elif os.path.getsize(path) < end:
            problems.append(f"{path} is truncated ({os.path.getsize(path)} bytes; the metadata records data up to "
                            f"byte {end})")
    if problems:
        raise ValueError(f"the checkpoint in {iter_dir} is damaged: " + "; ".join(problems) + f"; {_RECOPY}")


def architecture_differences(saved: argparse.Namespace, run: argparse.Namespace) -> list[tuple[str, object, object]]:
    """(arg name, saved value, run value) for each ``ARCHITECTURE_ARGS`` entry on which both are set and differ
    (pure; a value one side does not set, e.g. one Megatron derives later, is not compared)."""
    out = []
    for name in ARCHITECTURE_ARGS:
        if name == "num_query_groups" and not (getattr(saved, "group_query_attention", False)
                                               and getattr(run, "group_query_attention", False)):
            continue  # without GQA Megatron's validation sets it to the head count: the parser default means nothing
        a, b = getattr(saved, name, None), getattr(run, name, None)
        if a is not None and b is not None and a != b:
            out.append((name, a, b))
    return out


def check_load_checkpoint(run: argparse.Namespace) -> None:
    """Launcher-side check of ``--load`` (``run`` = the run's parsed Megatron args): its torch_dist checkpoint
    has every file its metadata references, none truncated, and was saved with this run's architecture
    (``ARCHITECTURE_ARGS``); ValueError naming the file or the differing values and what to do. Nothing is
    checked without --load, without a saved iteration (Megatron's fresh start; the preflight decides), for
    other checkpoint formats, with --use-checkpoint-args (the checkpoint's shapes win) or when upcycling
    (a dense checkpoint into an MoE model)."""
    load = run.load  # Megatron's parsed args: these fields always exist
    if not load or run.use_checkpoint_args or run.moe_use_upcycling:
        return
    if not os.path.isdir(load):
        return  # the preflight refuses it (or --ext-allow-fresh-start lets Megatron start from scratch)
    tracker = os.path.join(load, TRACKER)
    step = run.ckpt_step
    if step is None:
        if not os.path.isfile(tracker):
            return
        with open(tracker) as f:
            text = f.read().strip()
        if text != "release" and not text.isdigit():
            raise ValueError(f"{tracker} holds {text!r}, not an iteration number; fix: write the iteration to "
                             f"resume from into it, or pass --ckpt-step N")
        iter_dir = os.path.join(load, "release" if text == "release" else f"iter_{int(text):07d}")
    else:
        iter_dir = os.path.join(load, f"iter_{int(step):07d}")
    if not os.path.isdir(iter_dir):
        found = sorted(d for d in os.listdir(load) if d.startswith("iter_") or d == "release")
        raise ValueError(f"--load {load!r}: {iter_dir} does not exist (found: {', '.join(found) or 'none'}); fix: "
                         f"point {TRACKER} or --ckpt-step at one of those")
    if sharded_backend(iter_dir) != "torch_dist":
        return
    check_files(iter_dir)
    try:
        saved = read_args(iter_dir)
    except ValueError:
        return  # no saved args (not written by megatron.training): nothing to compare
    except Exception as err:
        raise ValueError(f"the checkpoint in {iter_dir} is damaged: its common state cannot be read "
                         f"({type(err).__name__}: {err}); {_RECOPY}") from None
    diffs = architecture_differences(saved, run)
    if diffs:
        listed = "; ".join(f"--{n.replace('_', '-')} {a} in the checkpoint, {b} in this run" for n, a, b in diffs)
        raise ValueError(f"--load {load!r} holds a checkpoint of a different architecture ({iter_dir}): {listed}; "
                         f"fix: pass the checkpoint's values, or --use-checkpoint-args, or --load a checkpoint of "
                         f"this model (--finetune does not change shapes)")
    # A release checkpoint (e.g. import-hf's) loads no optimizer or scheduler state: nothing to compare.
    schedule = [] if os.path.basename(iter_dir) == "release" else schedule_differences(saved, run)
    if schedule:
        listed = "; ".join(f"{what}: {a} in the checkpoint, {b} in this run" for what, a, b in schedule)
        raise ValueError(f"--load {load!r}: the checkpoint's learning-rate schedule differs from this run's ({listed}), "
                         f"which Megatron's OptimizerParamScheduler refuses when it loads the checkpoint; fix: "
                         f"--override-opt_param-scheduler (this run's schedule from here on) or "
                         f"--use-checkpoint-opt_param-scheduler (keep the checkpoint's)")


def schedule_differences(saved: argparse.Namespace, run: argparse.Namespace) -> list[tuple[str, object, object]]:
    """(what, checkpoint value, run value) where the run's LR/weight-decay schedule differs from the one saved, in
    the terms Megatron's ``OptimizerParamScheduler.load_state_dict`` compares (pure; iteration-based runs only:
    decay over ``--lr-decay-iters`` or ``--train-iters``, warm-up iterations or fraction, the global batch that turns
    iterations into samples). Empty when the run overrides or keeps the checkpoint's schedule, skips the optimizer
    (--no-load-optim, --finetune), or a value is unknown on either side."""
    if getattr(saved, "train_iters", None) is None:  # a checkpoint saved without an iteration-based schedule
        return []
    if (run.override_opt_param_scheduler or run.use_checkpoint_opt_param_scheduler or run.no_load_optim
            or run.finetune or run.train_iters is None):
        return []

    def decay(a):
        return a.lr_decay_iters or a.train_iters

    def warmup(a):
        return f"{a.lr_warmup_fraction} of decay" if a.lr_warmup_fraction is not None else a.lr_warmup_iters

    def weight_decay(a, which):
        value = getattr(a, f"{which}_weight_decay", None)
        return a.weight_decay if value is None else value

    checks = [
        ("learning rate (--lr)", saved.lr, run.lr),
        ("minimum learning rate (--min-lr)", saved.min_lr, run.min_lr),
        ("warm-up (--lr-warmup-iters/--lr-warmup-fraction)", warmup(saved), warmup(run)),
        ("decay iterations (--lr-decay-iters, else --train-iters)", decay(saved), decay(run)),
        ("decay style (--lr-decay-style)", saved.lr_decay_style, run.lr_decay_style),
        ("start weight decay", weight_decay(saved, "start"), weight_decay(run, "start")),
        ("end weight decay", weight_decay(saved, "end"), weight_decay(run, "end")),
        ("weight-decay increment style", saved.weight_decay_incr_style, run.weight_decay_incr_style),
    ]
    if run.global_batch_size is not None:  # iterations become samples through the global batch
        checks.append(("global batch size (--global-batch-size)", saved.global_batch_size, run.global_batch_size))
    return [(what, a, b) for what, a, b in checks if a is not None and b is not None and a != b]
