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
import io
import json
import os
import re
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
    backend = None
    try:
        with open(os.path.join(iter_dir, "metadata.json")) as f:
            backend = json.load(f).get("sharded_backend")
    except (OSError, ValueError):
        backend = None
    if backend != "torch_dist":
        raise ValueError(f"{iter_dir} is not a torch_dist checkpoint (metadata.json sharded_backend={backend!r}); "
                         f"fix: train with --ckpt-format torch_dist (Megatron's default)")
    return iter_dir, (None if release else iteration)


def read_common_state(iter_dir: str) -> dict:
    """The checkpoint's common (non-sharded) state: Megatron's ``args`` namespace, iteration, version."""
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
