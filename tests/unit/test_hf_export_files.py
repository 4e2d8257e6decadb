"""export-hf's folder writing without a model: safetensors shards + index, the byte tokenizer, input checks that
run before anything is written, and the torch_dist reader's key normalisation."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from megatron_moe_ext.checkpoint import hf_tokenizer
from megatron_moe_ext.checkpoint.hf_export import (
    INDEX_FILE,
    export_hf,
    parse_size,
    write_safetensors,
)
from megatron_moe_ext.checkpoint.hf_import import read_hf_tensors, vocab_flags
from megatron_moe_ext.checkpoint.torch_dist import (
    canonical_items,
    canonical_name,
    resolve_iteration,
)
from megatron_moe_ext.training.data import EOD_ID, VOCAB_SIZE, encode_bytes


def test_shards_and_index_hold_every_tensor_once(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.w": torch.randn(64, 64, generator=gen) for i in range(5)}
    tensors["bias"] = torch.randn(3, generator=gen).to(torch.bfloat16)
    files = write_safetensors(str(tmp_path), tensors, max_shard_bytes=2 * 64 * 64 * 4)
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    back = read_hf_tensors(str(tmp_path))
    for name, t in tensors.items():
        assert torch.equal(back[name], t.float())


def test_fused_experts_are_split_back_per_expert(tmp_path):
    from safetensors.torch import save_file

    gate_up = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # [E, 2F, H]
    down = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)  # [E, H, F]
    save_file({"model.layers.0.mlp.experts.gate_up_proj": gate_up, "model.layers.0.mlp.experts.down_proj": down},
              str(tmp_path / "model.safetensors"))
    back = read_hf_tensors(str(tmp_path))
    assert torch.equal(back["model.layers.0.mlp.experts.1.gate_proj.weight"], gate_up[1, :3])
    assert torch.equal(back["model.layers.0.mlp.experts.1.up_proj.weight"], gate_up[1, 3:])
    assert torch.equal(back["model.layers.0.mlp.experts.0.down_proj.weight"], down[0])


def test_parse_size():
    assert parse_size("2GB") == 2 << 30 and parse_size("1.5MB") == int(1.5 * (1 << 20)) and parse_size("10") == 10


def test_byte_tokenizer_matches_the_training_data_tokenisation(tmp_path):
    from transformers import AutoTokenizer

    args = argparse.Namespace(tokenizer_type="NullTokenizer", vocab_size=VOCAB_SIZE, seq_length=128)
    hf_tokenizer.write_tokenizer(str(tmp_path), hf_tokenizer.tokenizer_source(args, None), args)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "def f(x):\n\treturn x  # héllo ✓ 日本\r\n"
    ids = tok(text)["input_ids"]
    assert ids == [int(i) for i in encode_bytes(text.encode())]
    assert tok.eos_token_id == EOD_ID and tok.decode(ids) == text
    # import-hf recognises the folder's tokenizer as ours and rebuilds the same Megatron vocabulary
    flags = vocab_flags(str(tmp_path), {"eos_token_id": EOD_ID}, 384, 2)
    assert flags == ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB_SIZE),
                     "--make-vocab-size-divisible-by", "192"]


def test_unknown_tokenizer_needs_a_folder():
    args = argparse.Namespace(tokenizer_type="GPT2BPETokenizer", tokenizer_model=None, vocab_size=None)
    with pytest.raises(ValueError, match="--tokenizer DIR"):
        hf_tokenizer.tokenizer_source(args, None)


def _fake_checkpoint(root, backend="torch_dist", tracker="5", iteration=5):
    os.makedirs(root / f"iter_{iteration:07d}")
    (root / "latest_checkpointed_iteration.txt").write_text(tracker)
    (root / f"iter_{iteration:07d}" / "metadata.json").write_text(json.dumps({"sharded_backend": backend}))
    return str(root)


@pytest.mark.parametrize(
    "setup, kwargs, message",
    [
        (lambda p: str(p / "nope"), {}, "is not a directory"),
        (lambda p: _fake_checkpoint(p / "c", backend="zarr"), {}, "not a torch_dist checkpoint"),
        (lambda p: _fake_checkpoint(p / "c"), {"iteration": 7}, "iteration 7 is not in"),
        (lambda p: _fake_checkpoint(p / "c", tracker="abc"), {}, "not an iteration number"),
        (lambda p: _fake_checkpoint(p / "c"), {"dtype": "int8"}, "--dtype 'int8'"),
        (lambda p: _fake_checkpoint(p / "c"), {"target": "llama"}, "--target 'llama' is unknown"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, setup, kwargs, message):
    checkpoint = setup(tmp_path)
    out = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=message):
        export_hf(checkpoint, str(out), **kwargs)
    assert sorted(os.listdir(tmp_path)) == before  # no --out, no temporary folder left


def test_existing_out_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ValueError, match="already exists"):
        export_hf(_fake_checkpoint(tmp_path / "c"), str(out))
    assert (out / "keep").read_text() == "x"


def test_release_checkpoints_resolve(tmp_path):
    root = tmp_path / "c"
    (root / "release").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    (root / "release" / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    assert resolve_iteration(str(root)) == (str(root / "release"), None)


def test_stacked_keys_split_per_layer_and_back():
    stacked = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4)
    items = dict(canonical_items("decoder.layers.mlp.router.weight", stacked, 3))
    assert list(items) == [f"decoder.layers.{i}.mlp.router.weight" for i in range(3)]
    assert torch.equal(items["decoder.layers.2.mlp.router.weight"], stacked[2])
    assert canonical_name("decoder.layers.mlp.router.weight", 2) == "decoder.layers.2.mlp.router.weight"
    assert canonical_name("decoder.layers.1.mlp.u", 0) == "decoder.layers.1.mlp.u"
    assert dict(canonical_items("embedding.word_embeddings.weight", stacked, 3)).keys() == {
        "embedding.word_embeddings.weight"}
    with pytest.raises(ValueError, match="2 layers on its leading axis"):
        list(canonical_items("decoder.layers.mlp.router.weight", stacked[:2], 3))
