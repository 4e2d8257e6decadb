"""Damaged inputs are named with the file and what to do: a truncated or missing torch_dist shard, a damaged
``.metadata``, a checkpoint of another architecture given to --load, a corrupt safetensors file given to
import-hf; export-hf leaves no temporary folder behind when interrupted, and its folder follows the umask."""

from __future__ import annotations

import argparse
import json
import os
import stat

import pytest
import torch

from megatron_moe_ext.checkpoint import hf_export
from megatron_moe_ext.checkpoint.hf_import import read_hf_tensors
from megatron_moe_ext.checkpoint.hf_targets.base import HFModel
from megatron_moe_ext.checkpoint.torch_dist import (
    TRACKER,
    architecture_differences,
    check_files,
    check_load_checkpoint,
)

SAVED = dict(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4, num_experts=4)


def _torch_dist_checkpoint(root, *, iteration: int = 5, **saved) -> str:
    """A small real torch_dist iteration (two shard files) with Megatron's args in its common state."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    iter_dir = root / f"iter_{iteration:07d}"
    iter_dir.mkdir(parents=True)
    state = {f"decoder.layers.{i}.w": torch.arange(4096, dtype=torch.float32) + i for i in range(4)}
    dcp_save(state, storage_writer=FileSystemWriter(str(iter_dir), thread_count=2), no_dist=True)
    torch.save({"args": argparse.Namespace(**{**SAVED, **saved})}, iter_dir / "common.pt")  # Megatron's legacy form
    (iter_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (root / TRACKER).write_text(str(iteration))
    return str(root)


def _run(load: str, **values) -> argparse.Namespace:
    # What the check reads of Megatron's parsed args (which always have these fields).
    return argparse.Namespace(load=load, ckpt_step=None, use_checkpoint_args=False, moe_use_upcycling=False,
                              override_opt_param_scheduler=False, use_checkpoint_opt_param_scheduler=False,
                              no_load_optim=False, finetune=False, train_iters=None, **{**SAVED, **values})


def _shards(load: str) -> list[str]:
    iter_dir = os.path.join(load, "iter_0000005")
    return sorted(os.path.join(iter_dir, f) for f in os.listdir(iter_dir) if f.endswith(".distcp"))


def test_an_intact_checkpoint_of_the_same_model_passes(tmp_path):
    load = _torch_dist_checkpoint(tmp_path / "ckpt")
    check_load_checkpoint(_run(load))
    check_load_checkpoint(_run(load, ffn_hidden_size=None))  # a value the run derives later is not compared


def test_a_truncated_shard_is_named(tmp_path):
    load = _torch_dist_checkpoint(tmp_path / "ckpt")
    shard = _shards(load)[-1]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(ValueError, match=rf"{shard} is truncated .* bytes; the metadata records data up to byte"):
        check_load_checkpoint(_run(load))
    with pytest.raises(ValueError, match="copy the whole iteration folder again"):
        check_files(os.path.dirname(shard))


def test_a_missing_shard_is_named(tmp_path):
    load = _torch_dist_checkpoint(tmp_path / "ckpt")
    shard = _shards(load)[0]
    os.remove(shard)
    with pytest.raises(ValueError, match=rf"damaged: {shard} is missing"):
        check_load_checkpoint(_run(load))


def test_a_damaged_metadata_file_is_named(tmp_path):
    load = _torch_dist_checkpoint(tmp_path / "ckpt")
    metadata = os.path.join(load, "iter_0000005", ".metadata")
    with open(metadata, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=rf"{metadata} is damaged"):
        check_load_checkpoint(_run(load))
    os.remove(metadata)
    with pytest.raises(ValueError, match=rf"{metadata} is missing"):
        check_load_checkpoint(_run(load))


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_values(tmp_path):
    load = _torch_dist_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ValueError) as err:
        check_load_checkpoint(_run(load, hidden_size=128, num_experts=8))
    message = str(err.value)
    assert "different architecture" in message
    assert "--hidden-size 64 in the checkpoint, 128 in this run" in message
    assert "--num-experts 4 in the checkpoint, 8 in this run" in message
    assert "--num-layers" not in message and "fix:" in message


def test_what_is_not_checked(tmp_path):
    load = _torch_dist_checkpoint(tmp_path / "ckpt")
    other = dict(hidden_size=128)
    check_load_checkpoint(argparse.Namespace(**{**vars(_run(load, **other)), "use_checkpoint_args": True}))
    check_load_checkpoint(argparse.Namespace(**{**vars(_run(load, **other)), "moe_use_upcycling": True}))
    check_load_checkpoint(_run(None, **other))  # no --load
    check_load_checkpoint(_run(str(tmp_path / "absent"), **other))  # the preflight's case
    (tmp_path / "empty").mkdir()
    check_load_checkpoint(_run(str(tmp_path / "empty"), **other))  # no saved iteration: a fresh start


def test_architecture_differences_compare_only_values_both_set():
    saved = argparse.Namespace(hidden_size=64, num_layers=2, kv_channels=16)
    run = argparse.Namespace(hidden_size=64, num_layers=3, kv_channels=None)
    assert architecture_differences(saved, run) == [("num_layers", 2, 3)]


# -- import-hf: a corrupt safetensors file ------------------------------------------------------------------------
def test_a_corrupt_safetensors_file_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match=rf"{path}: the file is truncated or not a safetensors file; re-download "
                                         r"or re-export"):
        read_hf_tensors(str(tmp_path))


def test_a_truncated_safetensors_shard_is_named(tmp_path):
    files = hf_export.write_safetensors(str(tmp_path), {"a": torch.ones(256), "b": torch.zeros(256)},
                                        max_shard_bytes=1024)
    shard = tmp_path / files[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{shard}: the file is truncated or not a safetensors file"):
        read_hf_tensors(str(tmp_path))
    shard.unlink()
    with pytest.raises(ValueError, match=rf"{shard} is missing"):
        read_hf_tensors(str(tmp_path))


# -- export-hf: interrupted exports, folder permissions ------------------------------------------------------------
class _Target:
    name, native = "fake", True

    def export(self, args, state) -> HFModel:
        return HFModel(config={"model_type": "fake"}, tensors={"w": torch.ones(4)})


@pytest.fixture
def fake_export(tmp_path, monkeypatch):
    """export_hf up to its folder writing, without a checkpoint: the reading steps return a tiny model."""
    args = argparse.Namespace(num_layers=1, tokenizer_type="NullTokenizer", vocab_size=257, null_tokenizer_eod_id=None)
    monkeypatch.setattr(hf_export, "resolve_iteration", lambda checkpoint, iteration: (checkpoint, 1))
    monkeypatch.setattr(hf_export, "check_files", lambda iter_dir: None)
    monkeypatch.setattr(hf_export, "read_args", lambda iter_dir: args)
    monkeypatch.setattr(hf_export, "choose_target", lambda args, target: (_Target(), {}))
    monkeypatch.setattr(hf_export, "read_model_state", lambda iter_dir, num_layers: {})
    monkeypatch.setattr(hf_export.hf_tokenizer, "write_tokenizer", lambda folder, source, args: None)
    return tmp_path


def test_an_interrupted_export_leaves_no_temporary_folder(fake_export, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_export, "write_safetensors", interrupted)
    before = sorted(os.listdir(fake_export))
    with pytest.raises(KeyboardInterrupt):
        hf_export.export_hf(str(fake_export), str(fake_export / "out"), log=lambda line: None)
    assert sorted(os.listdir(fake_export)) == before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_the_exported_folder_follows_the_umask(fake_export, umask):
    old = os.umask(umask)
    try:
        out = hf_export.export_hf(str(fake_export), str(fake_export / "out"), log=lambda line: None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask
    for name in os.listdir(out):
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o666 & ~umask, name


def test_query_groups_are_compared_only_with_grouped_query_attention():
    # Unvalidated run args carry the parser's default (1); Megatron sets it to the head count without GQA.
    saved = argparse.Namespace(group_query_attention=False, num_query_groups=4)
    assert architecture_differences(saved, argparse.Namespace(group_query_attention=False, num_query_groups=1)) == []
    saved = argparse.Namespace(group_query_attention=True, num_query_groups=2)
    assert architecture_differences(saved, argparse.Namespace(group_query_attention=True, num_query_groups=4)) == [
        ("num_query_groups", 2, 4)]
