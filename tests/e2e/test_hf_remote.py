"""Export to our remote-code architecture, end to end: randomised torch_dist checkpoints saved on 2 gloo ranks, the
folder written by ``export_hf``, loaded as a user would (fresh process, offline, empty HF_HOME, cwd outside the
repository and the repository not importable, ``trust_remote_code=True``, fp32), compared with Megatron's logits
and greedy tokens.

Models: (a) the README demo (fine-grained experts + product-key router + PEER, TP=2/EP=2, PEER tables over TP);
(b) PEER tables over EP (TP=1/EP=2, 81 experts padded to 82 rows), a 2-head product-key router on a 2x4 grid with
sigmoid gates, scaling, separable and per-expert selection biases and noise weights, PEER with layernorm queries, relu, sigmoid gates,
sub-key top-k and a dense branch; (c) softmax routing with pre-softmax, a gated shared expert, QK-norm, GQA with
kv_channels 24, LayerNorm, half-rotary RoPE, tied embeddings and a dense first layer (no native target has that
combination); (d) Megatron's default flags (linear biases everywhere, GELU with the fused bias-GELU kernel's tanh
form in the dense MLP, LayerNorm, learned absolute positions, tied embeddings) with our fine-grained experts
(granularity 2, expansion 2, biased and prob-scaled fc2 bias) after a dense first layer, TP=2/EP=2. Each has a
negative control: the same folder with one config value changed must not match; (d) has a second one, the exact GELU
in its dense MLP, which must miss by more than the tolerance. (d) also goes back through import-hf: the re-export is
bit-identical and the imported checkpoint gives Megatron's logits.

Legend: B batch, S sequence, V (padded) vocabulary.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_moe_ext.checkpoint.hf_export import export_hf
from megatron_moe_ext.testing.distributed import run_distributed
from megatron_moe_ext.testing.hf_check import hf_outputs_many
from megatron_moe_ext.testing.random_checkpoint import (
    assert_greedy_equal,
    model_flags,
    save_random_checkpoint,
)

GREEDY_STEPS = 16
MODELS = {
    "demo_pk_peer_tp": (
        {"tp": 2, "ep": 2},
        ["--moe-granularity", "4", "--moe-expansion-rate", "4", "--moe-base-topk", "1", "--moe-router-type",
         "product_key", "--moe-pk-key-dim", "32", "--moe-peer-num-experts", "256", "--moe-peer-heads", "4",
         "--moe-peer-topk", "8", "--moe-peer-key-dim", "32", "--moe-peer-layers", "2", "--moe-peer-shard", "tp"],
        ("moe_peer_topk", 4),
    ),
    "pk_options_peer_ep": (
        {"tp": 1, "ep": 2},
        ["--num-experts", "16", "--moe-router-topk", "4", "--moe-ffn-hidden-size", "32", "--moe-router-type",
         "product_key", "--moe-pk-heads", "2", "--moe-pk-grid-rows", "2", "--moe-pk-key-dim", "16",
         "--moe-pk-query-norm", "rmsnorm", "--moe-router-score-function", "sigmoid",
         "--moe-router-topk-scaling-factor", "2.0", "--moe-pk-bias-balancing", "--moe-pk-expert-bias-balancing",
         "--moe-router-noisy-gating",
         "--moe-peer-num-experts", "81", "--moe-peer-layers", "2", "--moe-peer-shard", "ep", "--moe-peer-heads", "2",
         "--moe-peer-topk", "4", "--moe-peer-key-dim", "16", "--moe-peer-subkey-topk", "6",
         "--moe-peer-query-norm", "layernorm", "--moe-peer-activation", "relu", "--moe-peer-gate", "sigmoid",
         "--moe-peer-shared-ffn-hidden-size", "32"],
        ("moe_peer_gate", "softmax"),
    ),
    "softmax_shared_qknorm": (
        {"tp": 2, "ep": 1},
        ["--qk-layernorm", "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "24",
         "--normalization", "LayerNorm", "--norm-epsilon", "1e-6", "--moe-shared-expert-intermediate-size", "64",
         "--moe-shared-expert-gate", "--moe-router-pre-softmax", "--moe-layer-freq", "[0,1]", "--rotary-percent",
         "0.5", "--rotary-base", "1000"],
        ("moe_router_pre_softmax", False),
    ),
    "megatron_defaults_fine_grained": (
        {"tp": 2, "ep": 2},
        ["--normalization", "LayerNorm", "--position-embedding-type", "learned_absolute", "--moe-granularity", "2",
         "--moe-expansion-rate", "2", "--moe-layer-freq", "[0,1]"],
        ("position_embedding_type", "none"),
    ),
}
TIED = {"softmax_shared_qknorm", "megatron_defaults_fine_grained"}
# Flags of the embedded default model (and of the CPU runtime) a model drops to get Megatron's own defaults back:
# none of them has a flag that turns it on again (biases, GELU, the fused bias-GELU kernel are the defaults).
WITHOUT = {"megatron_defaults_fine_grained": ("--swiglu", "--disable-bias-linear", "--no-bias-gelu-fusion")}
# (model, field, wrong value, least max |logits diff|): the tanh GELU Megatron's fused kernel computes, taken for the
# exact one, must be visible beyond the logits tolerance.
SECOND_CONTROLS = [("megatron_defaults_fine_grained", "mlp_gelu_approximate", "none", 1e-4)]


def _control(folder: str, control, field: str, wrong) -> str:
    """A copy of ``folder`` with config.json's ``field`` set to ``wrong`` (which must differ)."""
    shutil.copytree(folder, control)
    config = json.loads((control / "config.json").read_text())
    assert config[field] != wrong
    config[field] = wrong
    (control / "config.json").write_text(json.dumps(config))
    return str(control)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per model: Megatron's outputs and the HF outputs of its folder and of its negative-control folder."""
    root = tmp_path_factory.mktemp("hf_remote")
    megatron, jobs = {}, {}
    for name, (parallel, overrides, (field, wrong)) in MODELS.items():
        flags = model_flags(*overrides, **parallel)
        if name in TIED:
            flags = [f for f in flags if f != "--untie-embeddings-and-output-weights"]
        flags = [f for f in flags if f not in WITHOUT.get(name, ())]
        megatron[name] = run_distributed(save_random_checkpoint, 2, flags, str(root / f"ckpt_{name}"),
                                         greedy_steps=GREEDY_STEPS, timeout_s=600)[0]
        # target auto: no native architecture may claim these models (they cannot reproduce them exactly).
        folder = export_hf(str(root / f"ckpt_{name}"), str(root / name), log=lambda _: None)
        jobs[name] = (folder, megatron[name]["tokens"])
        jobs[f"{name}_control"] = (_control(folder, root / f"{name}_control", field, wrong), megatron[name]["tokens"])
    for name, field, wrong, _ in SECOND_CONTROLS:
        jobs[f"{name}_{field}"] = (_control(str(root / name), root / f"{name}_{field}", field, wrong),
                                   megatron[name]["tokens"])
    return megatron, hf_outputs_many(jobs, GREEDY_STEPS), root


@pytest.mark.parametrize("name", sorted(MODELS))
def test_remote_code_reproduces_megatron_logits_and_greedy_tokens(exported, name):
    megatron, hf, root = exported
    assert hf["package_imports"] == []  # the folder alone was enough
    out = hf[name]
    assert out["class"] == "MegatronMoEExtForCausalLM" and out["module"].startswith("transformers_modules.")
    ref_BSV = megatron[name]["logits"]
    assert out["logits"].shape == ref_BSV.shape
    diff = (out["logits"] - ref_BSV).abs().max().item()
    print(f"{name}: max |logits - Megatron| = {diff:.3g}")
    assert diff <= 1e-4
    # Greedy tokens up to the first near-tie (top-2 margin within the tolerance): a near-tie may go either way.
    compared = assert_greedy_equal(out["greedy"], megatron[name]["greedy"], megatron[name]["greedy_margins"],
                                   tolerance=1e-4)
    assert compared >= 1
    config = json.loads((root / name / "config.json").read_text())
    assert config["model_type"] == "megatron_moe_ext" and "AutoModelForCausalLM" in config["auto_map"]
    assert config["tie_word_embeddings"] == (name in TIED)
    assert json.loads((root / name / "megatron_moe_ext_export.json").read_text())["target"] == "megatron_moe_ext"
    for file in ("configuration_megatron_moe_ext.py", "modeling_megatron_moe_ext.py", "product_key_core.py",
                 "peer_reference.py", "query_norm.py"):
        assert (root / name / file).is_file()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_negative_control_changed_config_value_does_not_match(exported, name):
    megatron, hf, _ = exported
    diff = (hf[f"{name}_control"]["logits"] - megatron[name]["logits"]).abs().max().item()
    print(f"{name}: {MODELS[name][2]} gives max |logits - Megatron| = {diff:.3g}")
    assert diff > 1e-3


def test_megatron_defaults_round_trip_through_import_hf(exported, tmp_path):
    """export -> import-hf -> export is bit-identical for Megatron's defaults (the import's flags keep the biases and
    the fused bias-GELU on), and the imported checkpoint, read at TP=2/EP=2, gives Megatron's logits."""
    from safetensors.torch import load_file

    from megatron_moe_ext.checkpoint.hf_import import FLAGS_FILE, import_hf
    from megatron_moe_ext.testing.hf_check import checkpoint_logits

    megatron, _, root = exported
    name = "megatron_defaults_fine_grained"
    imported = import_hf(str(root / name), str(tmp_path / "imported"), tp=2, log=lambda _: None)
    flags = (tmp_path / "imported" / FLAGS_FILE).read_text().split()
    assert "--disable-bias-linear" not in flags and "--no-bias-gelu-fusion" not in flags and "--swiglu" not in flags
    assert flags[flags.index("--position-embedding-type") + 1] == "learned_absolute"
    again = export_hf(imported, str(tmp_path / "again"), log=lambda _: None)

    def tensors(folder) -> dict[str, torch.Tensor]:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        return {k: v for file in files for k, v in load_file(str(folder / file)).items()}

    first, second = tensors(root / name), tensors(tmp_path / "again")
    assert first.keys() == second.keys() and any(k.endswith("experts.experts.linear_fc2.bias") for k in first)
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key
    configs = [json.loads((folder / "config.json").read_text()) for folder in (root / name, tmp_path / "again")]
    assert configs[0] == configs[1]
    logits_BSV = run_distributed(checkpoint_logits, 2, imported, megatron[name]["tokens"], tp=2, ep=2)[0]
    diff = (logits_BSV - megatron[name]["logits"]).abs().max().item()
    print(f"{name}: imported checkpoint, max |logits - Megatron| = {diff:.3g}")
    assert diff <= 1e-5


@pytest.mark.parametrize("name, field, wrong, least", SECOND_CONTROLS)
def test_second_negative_control_misses_by_more_than_the_tolerance(exported, name, field, wrong, least):
    megatron, hf, _ = exported
    diff = (hf[f"{name}_{field}"]["logits"] - megatron[name]["logits"]).abs().max().item()
    print(f"{name}: {field}={wrong!r} gives max |logits - Megatron| = {diff:.3g}")
    assert diff > least
