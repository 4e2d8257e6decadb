"""Export of the routers with variable experts per token to the remote-code architecture, end to end: Megatron's
logits of each checkpoint against transformers' logits of its export (fresh process, offline, the repository not
importable, ``trust_remote_code=True``, fp32), within 1e-4, plus greedy tokens.

Models: (a) expert choice with 2 null experts, trained 4 iterations by ``megatron-moe-ext train`` (EP=2; its
thresholds are the trained ones) and exported with its causal rule 'threshold'; randomised checkpoints saved on 2
gloo ranks (EP=2) of (b) ReLU routing, (c) top-k with 4 null experts, (d) expert choice with the 'token_choice'
rule, (e) product keys with 5 null experts (a 3 x 3 grid of 4 + 5 cells). (a) also goes through import-hf: the
re-export is bit-identical (thresholds included). Negative control: (a) exported with the other causal rule misses.

Legend: B batch, S sequence, V (padded) vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_moe_ext.checkpoint.hf_export import export_hf
from megatron_moe_ext.testing.distributed import run_distributed
from megatron_moe_ext.testing.hf_check import checkpoint_logits, hf_outputs_many
from megatron_moe_ext.testing.random_checkpoint import (
    assert_greedy_equal,
    fixed_batch,
    model_flags,
    save_random_checkpoint,
)

GREEDY_STEPS = 8
EC = ["--moe-router-type", "expert_choice", "--moe-token-dispatcher-type", "allgather"]
RANDOM_MODELS = {
    "relu": ["--moe-router-type", "relu", "--moe-token-dispatcher-type", "allgather"],
    "topk_null": ["--moe-null-experts", "4", "--moe-token-dispatcher-type", "allgather"],
    "ec_token_choice": [*EC, "--moe-ec-eval-rule", "token_choice"],
    "pk_null": ["--moe-router-type", "product_key", "--moe-null-experts", "5", "--moe-pk-key-dim", "16",
                "--moe-token-dispatcher-type", "allgather"],
}
TRAINED = "ec_threshold_null_trained"
TRAIN_FLAGS = [*EC, "--moe-null-experts", "2", "--moe-aux-loss-coeff", "0", "--train-iters", "4",
               "--eval-interval", "4", "--eval-iters", "1", "--save-interval", "4"]


def _train(save: str) -> None:
    from conftest import shared_cache

    cmd = [sys.executable, "-m", "megatron_moe_ext", "train", *TRAIN_FLAGS, "--save", save]
    env = dict(os.environ, MEGATRON_MOE_EXT_CACHE=shared_cache())
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False, stdin=subprocess.DEVNULL,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Megatron's outputs per model, the HF outputs of each folder (and of the control), and the root."""
    root = tmp_path_factory.mktemp("hf_routing_variants")
    megatron, jobs = {}, {}
    for name, overrides in RANDOM_MODELS.items():
        flags = model_flags(*overrides, tp=1, ep=2)
        megatron[name] = run_distributed(save_random_checkpoint, 2, flags, str(root / f"ckpt_{name}"),
                                         greedy_steps=GREEDY_STEPS, timeout_s=600)[0]
    _train(str(root / f"ckpt_{TRAINED}"))
    tokens_BS = fixed_batch(257)
    logits_BSV = run_distributed(checkpoint_logits, 2, str(root / f"ckpt_{TRAINED}"), tokens_BS, tp=1, ep=2)[0]
    megatron[TRAINED] = {"tokens": tokens_BS, "logits": logits_BSV}
    for name in [*RANDOM_MODELS, TRAINED]:
        folder = export_hf(str(root / f"ckpt_{name}"), str(root / name), log=lambda _: None)
        jobs[name] = (folder, megatron[name]["tokens"])
    control = root / "control"
    shutil.copytree(root / TRAINED, control)
    config = json.loads((control / "config.json").read_text())
    assert config["moe_ec_eval_rule"] == "threshold"
    config["moe_ec_eval_rule"] = "token_choice"
    (control / "config.json").write_text(json.dumps(config))
    jobs["control"] = (str(control), tokens_BS)
    return megatron, hf_outputs_many(jobs, GREEDY_STEPS), root


@pytest.mark.parametrize("name", [*sorted(RANDOM_MODELS), TRAINED])
def test_export_reproduces_megatron_logits(exported, name):
    megatron, hf, root = exported
    assert hf["package_imports"] == []
    out = hf[name]
    diff = (out["logits"] - megatron[name]["logits"]).abs().max().item()
    print(f"{name}: max |logits - Megatron| = {diff:.3g}")
    assert diff <= 1e-4
    if "greedy" in megatron[name]:
        assert assert_greedy_equal(out["greedy"], megatron[name]["greedy"], megatron[name]["greedy_margins"],
                                   tolerance=1e-4) >= 1
    export = json.loads((root / name / "megatron_moe_ext_export.json").read_text())
    assert export["target"] == "megatron_moe_ext"
    assert set(export["refused_native_targets"]) == {"qwen3_moe", "qwen2_moe", "glm4_moe"}


def test_trained_thresholds_route_a_variable_number_of_experts_and_the_other_rule_misses(exported):
    megatron, hf, root = exported
    from safetensors.torch import load_file

    index = json.loads((root / TRAINED / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    tensors = {k: v for f in files for k, v in load_file(str(root / TRAINED / f)).items()}
    thresholds = tensors["decoder.layers.0.mlp.router.ec_thresholds"]
    assert thresholds.shape == (6,) and thresholds.dtype == torch.float32 and (thresholds > 0).all()
    diff = (hf["control"]["logits"] - megatron[TRAINED]["logits"]).abs().max().item()
    print(f"{TRAINED}: exported with the token_choice rule instead, max |logits - Megatron| = {diff:.3g}")
    assert diff > 1e-3


def test_trained_expert_choice_round_trips_through_import_hf(exported, tmp_path):
    from safetensors.torch import load_file

    from megatron_moe_ext.checkpoint.hf_import import FLAGS_FILE, import_hf

    _, _, root = exported
    imported = import_hf(str(root / TRAINED), str(tmp_path / "imported"), tp=1, log=lambda _: None)
    flags = (tmp_path / "imported" / FLAGS_FILE).read_text().split()
    assert flags[flags.index("--moe-router-type") + 1] == "expert_choice"
    assert flags[flags.index("--moe-null-experts") + 1] == "2"
    again = export_hf(imported, str(tmp_path / "again"), log=lambda _: None)

    def tensors(folder) -> dict[str, torch.Tensor]:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        return {k: v for f in sorted(set(index["weight_map"].values())) for k, v in load_file(str(folder / f)).items()}

    first, second = tensors(root / TRAINED), tensors(tmp_path / "again")
    assert first.keys() == second.keys() and any(k.endswith("ec_thresholds") for k in first)
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key
    assert json.loads((root / TRAINED / "config.json").read_text()) == json.loads(
        (tmp_path / "again" / "config.json").read_text())
    assert again == str(tmp_path / "again")
