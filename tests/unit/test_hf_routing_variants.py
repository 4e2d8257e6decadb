"""The remote-code export of the routers with variable experts per token (expert choice, ReLU, null experts) without
a checkpoint: config and tensors (N + M router outputs, the expert-choice thresholds, the ReLU coefficient), the
export -> import identity and flags round trip, the remote model's routers against their definitions (the causal
rules; a later token never changes an earlier output), and the native targets' refusals. Megatron's logits against
the export: tests/e2e/test_hf_routing_variants_export.py.

Legend: B batch, S sequence, T tokens, N real experts, M null experts, E = N + M router outputs, V vocabulary.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys

import pytest
import torch

from megatron_moe_ext.checkpoint.hf_targets import choose_target
from megatron_moe_ext.checkpoint.hf_targets.remote import CODE_FILES, TARGET, expected_tensors

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--max-position-embeddings", "64", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
        "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--num-experts", "4",
        "--moe-ffn-hidden-size", "16", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0"]
VARIANTS = {
    "expert_choice_threshold_null": [*BASE, "--moe-router-type", "expert_choice", "--moe-null-experts", "2",
                                     "--moe-ec-capacity-factor", "1.5"],
    "expert_choice_token_choice_bias": [*[f for f in BASE if f != "--disable-bias-linear"], "--moe-router-type",
                                        "expert_choice", "--moe-ec-eval-rule", "token_choice"],
    "relu": [*BASE, "--moe-router-type", "relu", "--moe-relu-target-sparsity", "0.6", "--moe-relu-l1-coeff", "1e-4"],
    "topk_null": [*BASE, "--moe-null-experts", "4"],
    "product_key_null": [*BASE, "--moe-router-type", "product_key", "--moe-null-experts", "5", "--moe-pk-key-dim",
                         "8", "--moe-pk-query-norm", "rmsnorm"],
}
VOCAB = 64


def _parse(flags: list[str]) -> argparse.Namespace:
    from megatron_moe_ext.args import parse_megatron_args

    return parse_megatron_args(flags, validate=False)


def _random_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_tensors(config).items():
        t = torch.randn(shape, generator=gen)
        if name.endswith("ec_thresholds"):
            t = 0.15 + 0.1 * torch.rand(shape, generator=gen)  # some tokens pass each, some none
        elif name.endswith(("ec_threshold_mass", "relu_l1_coeff")):
            t = torch.rand(shape, generator=gen)
        elif "norm" in name and name.endswith("weight"):
            t = 1.0 + 0.2 * t
        elif not (name.endswith(("keys", "bias")) or "router.weight" in name):
            t = t / shape[-1] ** 0.5
        state[name] = t
    return state


def _model_of(variant: str, seed: int = 0):
    args = _parse(VARIANTS[variant])
    config = TARGET.config_dict(args, {"embedding.word_embeddings.weight": torch.empty(VOCAB, args.hidden_size)})
    state = _random_state(config, seed)
    return args, state, TARGET.export(args, state)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """The copied files as a package, imported from a temporary folder the way transformers imports them."""
    root = tmp_path_factory.mktemp("remote_pkg")
    pkg = root / "mmx_remote_routing_variants"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for path in CODE_FILES:
        shutil.copyfile(path, pkg / os.path.basename(path))
    sys.path.insert(0, str(root))
    try:
        modeling = importlib.import_module(f"{pkg.name}.modeling_megatron_moe_ext")
        configuration = importlib.import_module(f"{pkg.name}.configuration_megatron_moe_ext")
    finally:
        sys.path.remove(str(root))
    return argparse.Namespace(modeling=modeling, configuration=configuration)


def _build(remote, config: dict, state: dict[str, torch.Tensor]):
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    hf = remote.modeling.MegatronMoEExtForCausalLM(remote.configuration.MegatronMoEExtConfig(**fields)).eval()
    hf.load_state_dict(state)
    return hf


def test_config_and_tensors_of_each_router() -> None:
    h = 32
    _, _, ec = _model_of("expert_choice_threshold_null")
    c = ec.config
    assert (c["moe_router_type"], c["moe_null_experts"], c["moe_ec_eval_rule"], c["moe_ec_capacity_factor"]) == (
        "expert_choice", 2, "threshold", 1.5)
    shapes = expected_tensors(c)
    assert shapes["decoder.layers.0.mlp.router.weight"] == (6, h)  # N + M outputs
    assert shapes["decoder.layers.0.mlp.router.ec_thresholds"] == (6,)
    assert shapes["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"] == (4, 32, h)  # N real experts only
    assert "decoder.layers.0.mlp.router.ec_thresholds" in ec.keep_fp32
    _, _, bias = _model_of("expert_choice_token_choice_bias")
    assert expected_tensors(bias.config)["decoder.layers.0.mlp.router.bias"] == (4,)
    _, _, relu = _model_of("relu")
    assert (relu.config["moe_relu_target_sparsity"], relu.config["moe_relu_l1_coeff"]) == (0.6, 1e-4)
    assert expected_tensors(relu.config)["decoder.layers.1.mlp.router.relu_l1_coeff"] == (1,)
    _, _, pk = _model_of("product_key_null")
    assert expected_tensors(pk.config)["decoder.layers.0.mlp.router.row_keys"] == (1, 3, 4)  # 3 x 3 grid of 4 + 5


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_import_identity_and_flags_rebuild_the_config(variant: str, remote) -> None:
    _, state, model = _model_of(variant)
    assert set(model.tensors) == set(state)
    config = json.loads(json.dumps(model.config))
    flags, canonical = TARGET.import_model(config, model.tensors)
    assert all(torch.equal(canonical[n], t) for n, t in state.items())
    assert TARGET.config_dict(_parse(flags), state) == model.config
    hf = _build(remote, model.config, state)  # strict: the remote model holds exactly these tensors
    assert {n: tuple(t.shape) for n, t in hf.state_dict().items()} == expected_tensors(model.config)


def test_routers_follow_their_definitions(remote) -> None:
    """Each remote router against the contract's formulas, computed here from the weights."""
    torch.manual_seed(0)
    x_Th = torch.randn(40, 32)
    for variant in ("expert_choice_threshold_null", "expert_choice_token_choice_bias", "relu", "topk_null"):
        _, state, model = _model_of(variant)
        router = _build(remote, model.config, state).decoder.layers[0].mlp.router
        W = state["decoder.layers.0.mlp.router.weight"]
        b = state.get("decoder.layers.0.mlp.router.bias")
        logits_TE = x_Th @ W.t() + (0 if b is None else b)
        with torch.no_grad():
            probs_TK, ids_TK = router(x_Th)
        if variant == "relu":
            gates_TN = torch.relu(logits_TE)
            want = {(t, e): gates_TN[t, e].item() for t, e in (gates_TN > 0).nonzero().tolist()}
        elif variant == "topk_null":
            top_Tk = logits_TE.topk(2, dim=-1)
            p_Tk = top_Tk.values.softmax(-1)  # Megatron's softmax over the k selected of N + M logits
            want = {(t, e): p_Tk[t, j].item() for t in range(40) for j, e in enumerate(top_Tk.indices[t].tolist())}
        else:
            scores_TE = logits_TE.softmax(-1)
            if model.config["moe_ec_eval_rule"] == "threshold":
                map_TE = scores_TE >= state["decoder.layers.0.mlp.router.ec_thresholds"]
            else:
                map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter_(1, scores_TE.topk(2, -1).indices, True)
            want = {(t, e): scores_TE[t, e].item() for t, e in map_TE.nonzero().tolist()}
        got = {(t, e): probs_TK[t, j].item() for t in range(40) for j, e in enumerate(ids_TK[t].tolist()) if e >= 0}
        assert got.keys() == want.keys(), variant
        assert all(abs(got[key] - want[key]) < 1e-5 for key in want), variant
        counts_T = torch.tensor([sum(1 for (t, e) in want if t == i and e < 4) for i in range(40)])
        if variant in ("expert_choice_threshold_null", "relu"):  # variable: some tokens get none, some several
            assert counts_T.min() == 0 and counts_T.max() >= 2, (variant, counts_T)
        elif variant == "expert_choice_token_choice_bias":  # the token's top-k of the N scores
            assert (counts_T == 2).all()


@pytest.mark.parametrize("variant", ["expert_choice_threshold_null", "relu", "topk_null", "product_key_null"])
def test_later_tokens_never_change_earlier_outputs_and_null_slots_add_nothing(variant: str, remote) -> None:
    _, state, model = _model_of(variant, seed=2)
    hf = _build(remote, model.config, state)
    tokens_BS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    later_BS = tokens_BS.clone()
    later_BS[:, 8:] = (later_BS[:, 8:] + 7) % VOCAB
    with torch.no_grad():
        a_BSV, b_BSV = hf(tokens_BS).logits, hf(later_BS).logits
        steps, out = [], hf(tokens_BS[:, :6], use_cache=True)
        steps.append(out.logits)
        for s in range(6, 12):
            out = hf(tokens_BS[:, s:s + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    # (equal up to rounding: the experts run the batch's tokens grouped, and the groups change with later tokens)
    assert (a_BSV[:, :8] - b_BSV[:, :8]).abs().max().item() < 1e-5
    assert (a_BSV[:, 8:] - b_BSV[:, 8:]).abs().max().item() > 1e-2
    assert (torch.cat(steps, dim=1) - a_BSV).abs().max().item() < 1e-5  # cached decoding = full forward
    # A token whose slots are all null / empty gets exactly zero from the routed experts.
    moe = hf.decoder.layers[0].mlp
    x_Th = torch.randn(50, 32)
    with torch.no_grad():
        probs_TK, ids_TK = moe.router(x_Th)
        out_Th = moe.experts.experts(x_Th, probs_TK, ids_TK)
    idle_T = ((ids_TK < 0) | (ids_TK >= 4)).all(-1)
    assert idle_T.any(), variant
    assert torch.equal(out_Th[idle_T], torch.zeros_like(out_Th[idle_T]))


@pytest.mark.parametrize(("variant", "text"), [
    ("expert_choice_threshold_null", "expert-choice routing"),
    ("relu", "ReLU routing (gates ReLU(logits)"),
    ("topk_null", "--moe-null-experts 4: native routers have no zero-computation experts"),
])
def test_native_targets_refuse_with_the_reason(variant: str, text: str) -> None:
    target, refused = choose_target(_parse(VARIANTS[variant]))
    assert target.name == "megatron_moe_ext"
    assert set(refused) == {"qwen3_moe", "qwen2_moe", "glm4_moe"}
    for reasons in refused.values():
        assert any(text in r for r in reasons), reasons
    with pytest.raises(ValueError, match="--target qwen3_moe cannot reproduce this model exactly: .*fix: --target"):
        choose_target(_parse(VARIANTS[variant]), "qwen3_moe")


def test_config_refuses_inconsistent_router_values(remote) -> None:
    config = remote.configuration.MegatronMoEExtConfig
    with pytest.raises(ValueError, match="moe_ec_eval_rule='causal'; fix: one of"):
        config(moe_ec_eval_rule="causal")
    with pytest.raises(ValueError, match="moe_null_experts=2; fix: 0 with the ReLU router"):
        config(moe_router_type="relu", moe_null_experts=2)
