"""export-hf -> import-hf -> export-hf through the commands, on a randomised demo-architecture model (fine-grained
experts on the product-key router + a PEER layer) saved at TP=2/EP=2: the second export is bit-identical to the
first, the imported checkpoint reproduces Megatron's logits at another layout, `train --load` continues from
it, and bad input leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_cache
from safetensors.torch import load_file

from megatron_moe_ext.checkpoint.hf_import import FLAGS_FILE
from megatron_moe_ext.testing.distributed import run_distributed
from megatron_moe_ext.testing.hf_check import checkpoint_logits
from megatron_moe_ext.testing.random_checkpoint import (
    model_flags,
    save_random_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ("--moe-granularity", "4", "--moe-expansion-rate", "4", "--moe-base-topk", "1",
        "--moe-router-type", "product_key", "--moe-pk-key-dim", "32",
        "--moe-peer-num-experts", "256", "--moe-peer-heads", "4", "--moe-peer-topk", "8",
        "--moe-peer-key-dim", "32", "--moe-peer-layers", "2", "--moe-peer-shard", "tp")


def cli(*argv: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEGATRON_MOE_EXT_CACHE=shared_cache())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "megatron_moe_ext", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / file)))
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_roundtrip")
    ref = run_distributed(save_random_checkpoint, 2, model_flags(*DEMO, tp=2, ep=2), str(root / "ckpt"))[0]
    cli("export-hf", "--checkpoint", "ckpt", "--out", "hf1", "--max-shard-size", "64KB", cwd=root)
    return root, ref


def test_export_import_export_is_bit_exact_and_trainable(demo):
    root, ref = demo
    first = tensors_of(root / "hf1")
    assert len(set(json.loads((root / "hf1" / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    out = cli("import-hf", "--hf", "hf1", "--out", "imported", "--tp", "2", cwd=root).stdout
    assert "continue with: megatron-moe-ext train" in out
    assert (root / "imported" / "latest_checkpointed_iteration.txt").read_text() == "release"
    cli("export-hf", "--checkpoint", "imported", "--out", "hf2", "--max-shard-size", "64KB", cwd=root)
    second = tensors_of(root / "hf2")
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype and torch.equal(first[name], second[name]), name
    assert json.loads((root / "hf1" / "config.json").read_text()) == json.loads((root / "hf2" / "config.json").read_text())

    # The imported (TP=1, EP=1) checkpoint read at TP=2/EP=2 gives the original model's logits.
    logits = run_distributed(checkpoint_logits, 2, str(root / "imported"), ref["tokens"], tp=2, ep=2)[0]
    assert (logits - ref["logits"]).abs().max().item() <= 1e-5

    # The train entry continues from it, with the flags import-hf wrote, at EP=2.
    flags = (root / "imported" / FLAGS_FILE).read_text().split()
    log = cli("train", *flags, "--load", "imported", "--save", "continued", "--train-iters", "1",
              "--eval-iters", "1", "--eval-interval", "100", "--lr-warmup-iters", "0", "--expert-model-parallel-size",
              "2", cwd=root).stdout
    assert "loading release distributed checkpoint from imported" in log
    assert "iteration        1/       1" in log


def test_a_named_target_that_is_not_exact_is_refused(demo, capsys, monkeypatch):
    from megatron_moe_ext.cli import main  # in this process: the refusal comes before any tensor is read

    root, _ = demo
    before = sorted(os.listdir(root))
    monkeypatch.chdir(root)
    assert main(["export-hf", "--checkpoint", "ckpt", "--out", "q3", "--target", "qwen3_moe"]) == 2
    err = capsys.readouterr().err
    assert "--target qwen3_moe cannot reproduce this model exactly" in err and "product-key" in err
    assert sorted(os.listdir(root)) == before  # neither q3 nor a temporary folder


def test_import_refuses_bad_folders_and_leaves_nothing(demo, tmp_path):
    root, _ = demo
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(root / "hf1"):
        (broken / name).write_bytes((root / "hf1" / name).read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    dropped = "decoder.layers.1.mlp.u" if "decoder.layers.1.mlp.u" in index["weight_map"] else min(index["weight_map"])
    file = index["weight_map"].pop(dropped)
    kept = {k: v for k, v in load_file(str(broken / file)).items() if k != dropped}
    from safetensors.torch import save_file

    save_file(kept, str(broken / file), metadata={"format": "pt"})
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    before = sorted(os.listdir(tmp_path))
    proc = cli("import-hf", "--hf", "broken", "--out", "x", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "error:" in proc.stderr and dropped.split(".")[-1] in proc.stderr
    assert sorted(os.listdir(tmp_path)) == before

    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(config))
    proc = cli("import-hf", "--hf", "broken", "--out", "x", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "model_type 'llama'" in proc.stderr
    proc = cli("import-hf", "--hf", str(root / "hf1"), "--out", str(root / "hf1"), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == before
