"""``megatron-moe-ext export-hf``: a torch_dist checkpoint -> a Hugging Face model folder.

The checkpoint is read directly (any TP/EP/PP it was saved with, no model built, no GPU, no process group),
the target is chosen from the run's own arguments (a native architecture when it reproduces the model
exactly, otherwise our remote-code architecture), and the folder is written complete or not at all: sharded
safetensors with ``model.safetensors.index.json``, ``config.json``, ``generation_config.json``, the tokenizer,
and for remote code its ``.py`` files. Everything is built in a temporary sibling of ``--out`` and renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

import torch

from megatron_moe_ext.checkpoint import hf_tokenizer
from megatron_moe_ext.checkpoint.hf_targets import TARGET_NAMES, HFModel, choose_target
from megatron_moe_ext.checkpoint.torch_dist import (
    check_files,
    read_args,
    read_model_state,
    resolve_iteration,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CONFIG_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
INDEX_FILE = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2KB' or a number of bytes -> bytes."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}
    text = text.strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def _cast(model: HFModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: (t if name in model.keep_fp32 or not t.is_floating_point() else t.to(dtype)).contiguous()
            for name, t in model.tensors.items()}


def write_safetensors(folder: str, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    """Shards ``model-0000i-of-0000n.safetensors`` (tensors in name order, a shard closes before it would pass
    ``max_shard_bytes``) and the index; returns the shard file names."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, names in zip(files, shards):
        save_file({n: tensors[n] for n in names}, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files


def current_umask() -> int:
    """This process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _check_out(out: str) -> None:
    if os.path.exists(out):
        raise ValueError(f"--out {out!r} already exists; fix: choose a new folder (an export never overwrites)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"the parent of --out {out!r} does not exist; fix: create {parent!r} first")


def export_hf(checkpoint: str, out: str, *, iteration: int | None = None, dtype: str = "fp32",
              target: str = "auto", tokenizer: str | None = None, max_shard_size: str = "2GB",
              log=print) -> str:
    """Export ``checkpoint`` (a ``--save`` directory) to the new folder ``out``; returns ``out``.

    ValueError naming the problem, before anything is written, for: an existing ``out``, a directory that is
    not a torch_dist checkpoint, a missing iteration, an unknown dtype/target, a target that cannot reproduce
    the model exactly, no usable tokenizer."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}; fix: --dtype bf16 or fp32")
    if target != "auto" and target not in TARGET_NAMES:
        raise ValueError(f"--target {target!r} is unknown; fix: one of auto, {', '.join(TARGET_NAMES)}")
    max_shard_bytes = parse_size(max_shard_size)
    if max_shard_bytes <= 0:
        raise ValueError(f"--max-shard-size {max_shard_size!r} must be positive")
    _check_out(out)
    iter_dir, found_iteration = resolve_iteration(checkpoint, iteration)
    check_files(iter_dir)  # a missing or truncated shard: named, before any reading
    args = read_args(iter_dir)
    chosen, refused = choose_target(args, target)
    token_source = hf_tokenizer.tokenizer_source(args, tokenizer)
    for name, reasons in refused.items():
        log(f"export-hf: {name} refused (not exact): {'; '.join(reasons)}")
    log(f"export-hf: {iter_dir} -> {out} as {chosen.name} ({'native' if chosen.native else 'remote code'}), {dtype}")

    state = read_model_state(iter_dir, args.num_layers)
    model = chosen.export(args, state)
    del state
    tensors = _cast(model, DTYPES[dtype])
    config = dict(model.config)
    config["torch_dtype"] = _CONFIG_DTYPE[dtype]
    eos = hf_tokenizer.eos_token_id(args)
    if eos is not None:
        config.setdefault("eos_token_id", eos)
    generation = {"_from_model_config": False, "do_sample": False}
    if config.get("eos_token_id") is not None:
        generation["eos_token_id"] = config["eos_token_id"]

    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    try:
        # mkdtemp's owner-only 0700 would survive the rename: the folder follows the umask like any new folder.
        umask = current_umask()
        os.chmod(tmp, 0o777 & ~umask)
        files = write_safetensors(tmp, tensors, max_shard_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        hf_tokenizer.write_tokenizer(tmp, token_source, args)
        for path in model.code_files:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        provenance = {"checkpoint": os.path.abspath(checkpoint), "iteration": found_iteration,
                      "target": chosen.name, "dtype": dtype, "refused_native_targets": refused}
        with open(os.path.join(tmp, "megatron_moe_ext_export.json"), "w") as f:
            json.dump(provenance, f, indent=2)
        for name in os.listdir(tmp):  # safetensors writes its files 0600: they follow the umask too
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export-hf: wrote {len(tensors)} tensors in {len(files)} shard(s) to {out}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-moe-ext export-hf",
        description="Export a torch_dist checkpoint (any TP/EP/PP) to a Hugging Face folder: a native "
                    "architecture when it is exact (qwen3_moe, qwen2_moe, glm4_moe), else our remote-code "
                    "architecture (load with trust_remote_code=True).")
    p.add_argument("--checkpoint", required=True, help="the --save directory of a training run")
    p.add_argument("--iteration", type=int, default=None, help="iteration to export (default: the latest)")
    p.add_argument("--out", required=True, help="new folder to write (never overwritten)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weight dtype on disk (default fp32)")
    p.add_argument("--target", default="auto", choices=["auto", *TARGET_NAMES],
                   help="HF architecture (default auto: first exact native target, else megatron_moe_ext)")
    p.add_argument("--tokenizer", default=None,
                   help="Hugging Face tokenizer folder to copy (default: derived from the run's tokenizer)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    return p


def main(argv: Sequence[str]) -> int:
    ns = build_parser().parse_args(list(argv))
    try:
        export_hf(ns.checkpoint, ns.out, iteration=ns.iteration, dtype=ns.dtype, target=ns.target,
                  tokenizer=ns.tokenizer, max_shard_size=ns.max_shard_size)
    except ValueError as err:
        print(f"megatron-moe-ext export-hf: error: {err}", file=sys.stderr)
        return 2
    return 0
