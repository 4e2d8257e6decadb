"""``megatron-moe-ext import-hf``: a Hugging Face folder (any architecture export-hf writes) -> a torch_dist
checkpoint that ``megatron-moe-ext train --load`` continues from, at the TP/EP chosen when training.

The target named by ``config.json``'s ``model_type`` turns the folder's config and tensors into Megatron model
flags and the canonical state (``checkpoint/torch_dist.py``). One CPU rank then builds that model through the
train entry's own parser, config, builder and specs, copies every canonical tensor into the model's sharded
state dict (stacked layer keys get their layer slice; nothing may be left over or missing), and saves it with
megatron.training's ``save_checkpoint``; the result is renamed to Megatron's ``release`` layout, which a
``--load`` reads as iteration 0 without optimizer or RNG state (what Megatron's own converters write).
Written in a temporary sibling of ``--out`` and renamed: complete or absent.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence

import torch

from megatron_moe_ext.checkpoint import hf_tokenizer
from megatron_moe_ext.checkpoint.hf_export import INDEX_FILE
from megatron_moe_ext.checkpoint.hf_targets import TARGET_NAMES, get_target
from megatron_moe_ext.checkpoint.torch_dist import TRACKER, canonical_name

FLAGS_FILE = "megatron_flags.txt"
_FUSED_GATE_UP = re.compile(r"^(.*\.mlp\.experts)\.gate_up_proj$")
_FUSED_DOWN = re.compile(r"^(.*\.mlp\.experts)\.down_proj$")


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, with a missing or damaged file reported as a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing (listed in the folder's {INDEX_FILE}); re-download or re-export the "
                         f"folder")
    try:
        return load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{path}: the file is truncated or not a safetensors file; re-download or re-export "
                         f"({type(err).__name__}: {err})") from None


def read_hf_tensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a HF folder (sharded with an index, or one model.safetensors), in fp32; experts that
    transformers 5 wrote fused (``save_original_format=False``) are split back into the per-expert names."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{index} is not a safetensors index (no readable 'weight_map': {err!r}); the file is "
                             f"damaged: re-download or re-export the folder") from None
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{folder!r} has neither {INDEX_FILE} nor model.safetensors; fix: pass a folder written by "
                         f"save_pretrained or export-hf")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for name, t in _load_safetensors(os.path.join(folder, file)).items():
            t = t.float() if t.is_floating_point() else t
            gate_up, down = _FUSED_GATE_UP.match(name), _FUSED_DOWN.match(name)
            if gate_up is not None and t.dim() == 3:  # [E, 2F, H], gate rows first
                for e, (g, u) in enumerate(zip(*t.chunk(2, dim=1))):
                    tensors[f"{gate_up.group(1)}.{e}.gate_proj.weight"] = g.clone()
                    tensors[f"{gate_up.group(1)}.{e}.up_proj.weight"] = u.clone()
            elif down is not None and t.dim() == 3:  # [E, H, F]
                for e, w in enumerate(t):
                    tensors[f"{down.group(1)}.{e}.down_proj.weight"] = w.clone()
            else:
                tensors[name] = t
    return tensors


def vocab_flags(folder: str, config: dict, vocab_rows: int, tp: int) -> list[str]:
    """Tokenizer flags for the folder's tokenizer, and a vocabulary padding that gives exactly ``vocab_rows``
    embedding rows at TP ``tp`` (Megatron pads the tokenizer's size up to a multiple of divisor * TP)."""
    tokenizer_file = os.path.join(folder, "tokenizer.json")
    eos = config.get("eos_token_id")
    flags: list[str]
    size: int | None = None
    if os.path.isfile(tokenizer_file) and isinstance(eos, int):
        with open(tokenizer_file) as f:
            if json.load(f) == json.loads(json.dumps(hf_tokenizer.byte_tokenizer_json(eos))):
                size = eos + 1  # our byte tokenizer: NullTokenizer, end of document = vocab_size - 1
    if size is not None:
        flags = ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(size)]
    elif os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", os.path.abspath(folder)]
    else:
        raise ValueError(f"{folder!r} has no tokenizer (tokenizer_config.json); fix: save the tokenizer into it")
    if vocab_rows % tp:
        raise ValueError(f"the model's {vocab_rows} vocabulary rows do not split over --tp {tp}; fix: a --tp dividing "
                         f"{vocab_rows}")
    return [*flags, "--make-vocab-size-divisible-by", str(vocab_rows // tp)]


_PEER_TABLE = re.compile(r"\.mlp\.(u|v)$")


def _fit_table_rows(table_ND: torch.Tensor, rows: int) -> torch.Tensor:
    """A PEER table saved under another shard count: its rows past N are padding (ceil(N / shards) * shards rows,
    never selected), so they are cut or zero-filled to the rows this layout has."""
    if table_ND.shape[0] >= rows:
        return table_ND[:rows]
    return torch.cat([table_ND, table_ND.new_zeros(rows - table_ND.shape[0], table_ND.shape[1])])


def _fill_rank(flags: list[str], state_file: str, save_dir: str) -> list[str]:
    """One CPU rank: build the model of ``flags``, copy the canonical state in, save at iteration 0."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.training.checkpointing import save_checkpoint

    from megatron_moe_ext.args import parse_megatron_args
    from megatron_moe_ext.checkpoint.model import build_model

    canonical = torch.load(state_file, weights_only=True)
    with contextlib.redirect_stdout(io.StringIO()):  # Megatron prints every argument; the command prints its own
        args = parse_megatron_args([*flags, "--save", save_dir])
        model = build_model(args)
    used: set[str] = set()
    problems: list[str] = []
    # Factories (SwiGLU fc1 under TP) become plain sharded tensors whose data are views of the parameters.
    sharded = model.sharded_state_dict()
    apply_factories(sharded)  # in place
    with torch.no_grad():
        for sh in nested_values(sharded):
            if not isinstance(sh, ShardedTensor):
                continue  # extra states (FP8 metadata): none on CPU
            offsets, global_shape = sh.global_offset, sh.global_shape
            name = canonical_name(sh.key, offsets[0] if offsets else 0)
            if name != sh.key:  # stacked layers: the canonical tensor has no layer axis
                offsets, global_shape = offsets[1:], global_shape[1:]
            if name not in canonical:
                problems.append(f"missing {name}")
                continue
            value = canonical[name]
            if _PEER_TABLE.search(name) and value.dim() == 2 and value.shape[1:] == tuple(global_shape[1:]):
                value = _fit_table_rows(value, global_shape[0])
            if tuple(value.shape) != tuple(global_shape):
                problems.append(f"{name}: HF gives {tuple(value.shape)}, the model has {tuple(global_shape)}")
                continue
            # The piece this tensor holds: prepended axes (one expert, one layer) have length 1 locally.
            lengths = (1,) * (len(offsets) - sh.data.dim()) + tuple(sh.data.shape)
            piece = value[tuple(slice(o, o + n) for o, n in zip(offsets, lengths))]
            sh.data.copy_(piece.reshape(sh.data.shape))
            used.add(name)
    problems += [f"unexpected {n}" for n in sorted(set(canonical) - used)]
    if problems:
        raise ValueError("the HF tensors do not fit the model built from their config: " + "; ".join(problems[:8]))
    args.iteration = 0
    with contextlib.redirect_stdout(io.StringIO()):
        save_checkpoint(0, [model], None, None, 0)
    torch.distributed.barrier()
    return flags


def _fill_entry(argv: list[str]) -> None:
    """The rank started by :func:`import_hf` (``argv``: its job file): set up, fill, save; a ValueError (the HF
    tensors do not fit) is written to the job's error file for the launcher to report."""
    from megatron_moe_ext.runtime.rank import setup_rank

    with open(argv[0]) as f:
        job = json.load(f)
    setup_rank("import")
    try:
        _fill_rank(job["flags"], job["state_file"], job["save_dir"])
    except ValueError as err:
        with open(job["error_file"], "w") as f:
            f.write(str(err))
        raise SystemExit(2) from None


def import_hf(folder: str, out: str, *, tp: int = 1, log=print) -> str:
    """Import the HF ``folder`` into the new checkpoint directory ``out``; returns ``out``. The Megatron flags
    that rebuild the model (tokenizer and vocabulary included) are written to ``out/megatron_flags.txt``."""
    from megatron_moe_ext.runtime.local_ranks import start_local_ranks
    from megatron_moe_ext.runtime.rank import CPU_ARGS

    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"--hf {folder!r} has no config.json; fix: pass a Hugging Face model folder")
    if os.path.exists(out):
        raise ValueError(f"--out {out!r} already exists; fix: choose a new folder (an import never overwrites)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"the parent of --out {out!r} does not exist; fix: create {parent!r} first")
    if tp < 1:
        raise ValueError(f"--tp {tp} must be >= 1")
    with open(config_file) as f:
        config = json.load(f)
    model_type = config.get("model_type")
    if model_type not in TARGET_NAMES:
        raise ValueError(f"model_type {model_type!r} is not one we import; fix: a folder of one of "
                         f"{', '.join(TARGET_NAMES)} (what export-hf writes)")
    tensors = read_hf_tensors(folder)
    model_flags, canonical = get_target(model_type).import_model(config, tensors)
    del tensors
    vocab_rows = canonical["embedding.word_embeddings.weight"].shape[0]
    user_flags = [*model_flags, *vocab_flags(folder, config, vocab_rows, tp)]
    seq = str(config.get("max_position_embeddings") or 4096)
    if "--seq-length" not in user_flags:
        user_flags += ["--seq-length", seq]
    if "--max-position-embeddings" not in user_flags:
        user_flags += ["--max-position-embeddings", seq]
    # The rank only builds and saves (no forward): the model flags alone say whether the MLPs fuse bias and GELU
    # (saved with the checkpoint's args, what a re-export reads), not the CPU runtime's --no-bias-gelu-fusion.
    cpu_args = [f for f in CPU_ARGS if f != "--no-bias-gelu-fusion"]
    rank_flags = [*cpu_args, "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1",
                  "--lr", "1e-4", "--ckpt-format", "torch_dist", "--save-interval", "1", "--hidden-dropout", "0", "--attention-dropout",
                  "0", *user_flags]

    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)
    try:
        state_file = os.path.join(tmp, "canonical.pt")
        torch.save(canonical, state_file)
        del canonical
        save_dir = os.path.join(tmp, "ckpt")
        log(f"import-hf: {folder} ({model_type}) -> {out}")
        job = os.path.join(tmp, "job.json")
        with open(job, "w") as f:
            json.dump({"flags": rank_flags, "state_file": state_file, "save_dir": save_dir,
                       "error_file": os.path.join(tmp, "error.txt")}, f)
        # One local rank (gloo on CPU), one intra-op thread: this process has run tensor code already.
        rc = start_local_ranks(_fill_entry, [job], 1, threads_per_rank=1, preload=("megatron.training",))
        if os.path.exists(os.path.join(tmp, "error.txt")):
            # A mismatch found on the rank is the user's input problem: report its message, not a traceback.
            with open(os.path.join(tmp, "error.txt")) as f:
                raise ValueError(f.read())
        if rc != 0:
            raise RuntimeError(f"import-hf: the checkpoint-writing rank failed (exit code {rc}); see its traceback above")
        os.rename(os.path.join(save_dir, "iter_0000000"), os.path.join(save_dir, "release"))
        with open(os.path.join(save_dir, TRACKER), "w") as f:
            f.write("release")
        with open(os.path.join(save_dir, FLAGS_FILE), "w") as f:
            f.write(shlex.join(user_flags) + "\n")
        os.rename(save_dir, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"import-hf: continue with: megatron-moe-ext train $(cat {os.path.join(out, FLAGS_FILE)}) --load {out} "
        f"--data-path ... --save NEW_DIR (release checkpoint: iteration 0, fresh optimizer)")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-moe-ext import-hf",
        description="Import a Hugging Face folder (qwen3_moe, qwen2_moe, glm4_moe, or our megatron_moe_ext remote "
                    "code) into a torch_dist checkpoint that `megatron-moe-ext train --load` continues from.")
    p.add_argument("--hf", required=True, help="the Hugging Face model folder")
    p.add_argument("--out", required=True, help="new checkpoint directory to write (never overwritten)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor parallel size you will train at: the vocabulary padding is chosen so the "
                        "embedding keeps exactly the folder's rows there (default 1)")
    return p


def main(argv: Sequence[str]) -> int:
    ns = build_parser().parse_args(list(argv))
    try:
        import_hf(ns.hf, ns.out, tp=ns.tp)
    except ValueError as err:
        print(f"megatron-moe-ext import-hf: error: {err}", file=sys.stderr)
        return 2
    return 0
