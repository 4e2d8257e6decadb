"""`train --load` of a damaged checkpoint or one of another architecture fails in the launcher, before any rank
starts, naming the file or the differing values (checkpoint/torch_dist.py: check_load_checkpoint)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os

import pytest
import torch
from conftest import shared_cache

from megatron_moe_ext.cli import main


def _launcher(tmp_path, monkeypatch, *args: str) -> tuple[int, str]:
    monkeypatch.setenv("MEGATRON_MOE_EXT_CACHE", shared_cache())
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(["train", "--dry-run", *args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, err.getvalue()


@pytest.fixture
def checkpoint(tmp_path):
    """A small real torch_dist checkpoint whose saved args have the embedded default's shapes."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    iter_dir = tmp_path / "ckpt" / "iter_0000005"
    iter_dir.mkdir(parents=True)
    state = {f"decoder.layers.{i}.w": torch.arange(4096, dtype=torch.float32) + i for i in range(4)}
    dcp_save(state, storage_writer=FileSystemWriter(str(iter_dir), thread_count=2), no_dist=True)
    saved = argparse.Namespace(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4, num_experts=4)
    torch.save({"args": saved}, iter_dir / "common.pt")  # Megatron's legacy common-state file
    (iter_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("5")
    return str(tmp_path / "ckpt")


def test_the_matching_checkpoint_passes_and_another_architecture_is_refused(tmp_path, monkeypatch, checkpoint):
    assert _launcher(tmp_path, monkeypatch, "--load", checkpoint)[0] == 0
    code, err = _launcher(tmp_path, monkeypatch, "--load", checkpoint, "--hidden-size", "128")
    assert code == 2 and "--hidden-size 64 in the checkpoint, 128 in this run" in err


def test_a_truncated_shard_is_refused_naming_it(tmp_path, monkeypatch, checkpoint):
    iter_dir = os.path.join(checkpoint, "iter_0000005")
    shard = sorted(os.path.join(iter_dir, f) for f in os.listdir(iter_dir) if f.endswith(".distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(16)
    code, err = _launcher(tmp_path, monkeypatch, "--load", checkpoint)
    assert code == 2 and f"{shard} is truncated" in err
