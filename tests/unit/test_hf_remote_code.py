"""The remote-code HF target (``checkpoint/hf_targets/remote.py``) and its model (``checkpoint/remote_code/``) without
a checkpoint: the copied-file import rule, the config class, export -> import bit identity and the flags round trip
on synthetic states, the parameter tree against ``expected_tensors``, the KV cache, Megatron's routing function.

The remote files are imported the way a folder holds them: copied flat into a temporary package (relative imports
between them, nothing of this repository).

Legend: B batch, S sequence, T tokens, E experts, K top-k, V vocabulary.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import shutil
import sys

import pytest
import torch

from megatron_moe_ext.checkpoint.hf_targets import get_target
from megatron_moe_ext.checkpoint.hf_targets.remote import (
    CODE_FILES,
    TARGET,
    expected_tensors,
)

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
        "--max-position-embeddings", "64", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
        "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights"]

# Train-entry flags of models the remote architecture must reproduce (one per group of options).
VARIANTS = {
    "product_key_and_peer": [
        *BASE, "--num-experts", "16", "--moe-ffn-hidden-size", "32", "--moe-router-topk", "4",
        "--moe-router-type", "product_key", "--moe-pk-key-dim", "32", "--moe-peer-num-experts", "256",
        "--moe-peer-heads", "4", "--moe-peer-topk", "8", "--moe-peer-key-dim", "32", "--moe-peer-layers", "2"],
    "product_key_options_peer_options": [
        *BASE, "--num-experts", "16", "--moe-ffn-hidden-size", "32", "--moe-router-topk", "4",
        "--moe-router-type", "product_key", "--moe-pk-heads", "2", "--moe-pk-grid-rows", "2", "--moe-pk-key-dim", "16",
        "--moe-pk-query-norm", "rmsnorm", "--moe-router-score-function", "sigmoid",
        "--moe-router-topk-scaling-factor", "2.0", "--moe-pk-bias-balancing", "--moe-pk-expert-bias-balancing",
        "--moe-router-noisy-gating",
        "--moe-pk-subkey-topk", "2", "--moe-peer-num-experts", "81", "--moe-peer-layers", "1", "--moe-peer-heads", "2",
        "--moe-peer-topk", "4", "--moe-peer-key-dim", "16", "--moe-peer-subkey-topk", "6",
        "--moe-peer-query-norm", "layernorm", "--moe-peer-activation", "relu", "--moe-peer-gate", "sigmoid",
        "--moe-peer-shared-ffn-hidden-size", "32"],
    "softmax_shared_qknorm_tied": [
        *[f for f in BASE if f != "--untie-embeddings-and-output-weights"], "--qk-layernorm",
        "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "24", "--normalization", "LayerNorm",
        "--norm-epsilon", "1e-6", "--num-experts", "4", "--moe-ffn-hidden-size", "48", "--moe-router-topk", "2",
        "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-gate", "--moe-router-pre-softmax",
        "--moe-layer-freq", "[0,1]", "--rotary-percent", "0.5", "--rotary-base", "1000", "--add-qkv-bias"],
    "sigmoid_groups_bias_squared_relu": [
        *[f for f in BASE if f != "--swiglu"], "--squared-relu", "--num-experts", "8", "--moe-ffn-hidden-size", "32",
        "--moe-router-topk", "4", "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
        "--moe-router-num-groups", "4", "--moe-router-group-topk", "2", "--moe-router-topk-scaling-factor", "2.5",
        "--moe-router-noisy-gating", "--moe-apply-probs-on-input", "--moe-shared-expert-intermediate-size", "32",
        "--use-rope-scaling", "--rope-scaling-factor", "4.0", "--rotary-seq-len-interpolation-factor", "2",
        "--moe-router-dtype", "fp64"],
    "dense_gelu_no_positions": [
        *[f for f in BASE if f != "--swiglu"], "--position-embedding-type", "none", "--moe-peer-num-experts", "64",
        "--moe-peer-layers", "all", "--moe-peer-heads", "1", "--moe-peer-topk", "2", "--moe-peer-key-dim", "8",
        "--moe-peer-query-norm", "none", "--moe-peer-activation", "silu"],
    # Megatron's defaults: biases, GELU (its fused bias-GELU: tanh), LayerNorm, learned absolute positions, tied.
    "megatron_defaults": [
        *[f for f in BASE if f not in ("--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights")],
        "--normalization", "LayerNorm", "--position-embedding-type", "learned_absolute", "--num-experts", "4",
        "--moe-ffn-hidden-size", "32", "--moe-router-topk", "2", "--moe-layer-freq", "[0,1]"],
    "biases_exact_gelu_probs_on_input_peer_branch": [
        *[f for f in BASE if f not in ("--swiglu", "--disable-bias-linear")], "--no-bias-gelu-fusion",
        "--num-layers", "3", "--num-experts", "8", "--moe-ffn-hidden-size", "32", "--moe-router-topk", "1",
        "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-apply-probs-on-input",
        "--moe-layer-freq", "[0,1,1]", "--moe-peer-num-experts", "64", "--moe-peer-layers", "3",
        "--moe-peer-heads", "1", "--moe-peer-topk", "2", "--moe-peer-key-dim", "8",
        "--moe-peer-shared-ffn-hidden-size", "32"],
    # add_bias_linear with product keys and PEER: their query projections carry query_bias [H*D].
    "product_key_peer_query_biases": [
        *[f for f in BASE if f != "--disable-bias-linear"], "--num-experts", "18", "--moe-ffn-hidden-size", "32",
        "--moe-router-topk", "4", "--moe-router-type", "product_key", "--moe-pk-heads", "2", "--moe-pk-key-dim", "16",
        "--moe-pk-query-norm", "rmsnorm", "--moe-peer-num-experts", "64", "--moe-peer-layers", "2",
        "--moe-peer-heads", "2", "--moe-peer-topk", "4", "--moe-peer-key-dim", "8", "--moe-peer-query-norm", "layernorm"],
}
VOCAB = 96


def _parse(flags: list[str]) -> argparse.Namespace:
    """Megatron's argument namespace of our train entry's flags (parse and our derivation, no validation)."""
    from megatron_moe_ext.args import parse_megatron_args

    return parse_megatron_args(flags, validate=False)


def _stub_state(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The tensors ``config_dict`` reads shapes from (vocabulary rows, PEER table rows)."""
    stub = {"embedding.word_embeddings.weight": torch.empty(VOCAB, args.hidden_size)}
    for i in range(args.num_layers):
        stub[f"decoder.layers.{i}.mlp.u"] = torch.empty(getattr(args, "moe_peer_num_experts", None) or 1, 1)
    return stub


def _random_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_tensors(config).items():
        t = torch.randn(shape, generator=gen)
        if name.endswith("running_var"):
            t = 0.5 + torch.rand(shape, generator=gen)
        elif "norm" in name and name.endswith("weight"):
            t = 1.0 + 0.2 * t
        elif not (name.endswith(("keys", "bias")) or "router.weight" in name):
            t = t / shape[-1] ** 0.5
        state[name] = t
    return state


def _model_of(flags: list[str], seed: int = 0):
    args = _parse(flags)
    config = TARGET.config_dict(args, _stub_state(args))
    state = _random_state(config, seed)
    return args, state, TARGET.export(args, state)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """The copied files as a package (``remote.modeling``, ``remote.configuration``), imported from a temporary
    folder the way transformers imports a model folder's files."""
    root = tmp_path_factory.mktemp("remote_pkg")
    pkg = root / "mmx_remote_code_under_test"
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


def _build(remote, config: dict):
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    return remote.modeling.MegatronMoEExtForCausalLM(remote.configuration.MegatronMoEExtConfig(**fields)).eval()


# -- the copied files --------------------------------------------------------------------------------------------


def test_remote_files_import_only_torch_transformers_stdlib_and_each_other(tmp_path):
    names = [os.path.basename(p) for p in CODE_FILES]
    assert len(set(names)) == len(names), f"copied file names collide: {names}"
    siblings = {n[:-3] for n in names}
    allowed_roots = {"torch", "transformers", "__future__"} | set(sys.stdlib_module_names)
    for path in CODE_FILES:
        assert os.path.isfile(path), path
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in allowed_roots, f"{path}: import {alias.name}"
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level == 1 and node.module in siblings, f"{path}: from {'.' * node.level}{node.module}"
                else:
                    assert node.module.split(".")[0] in allowed_roots, f"{path}: from {node.module} import ..."
    # transformers' own check (what from_pretrained runs): every import resolvable, relative ones all shipped.
    from transformers.dynamic_module_utils import (
        check_imports,
        get_relative_import_files,
    )

    for path in CODE_FILES:  # flat, as in an exported folder
        shutil.copyfile(path, tmp_path / os.path.basename(path))
        check_imports(tmp_path / os.path.basename(path))
    shipped = {os.path.basename(p) for p in get_relative_import_files(tmp_path / "modeling_megatron_moe_ext.py")}
    assert shipped == set(names) - {"modeling_megatron_moe_ext.py"}


def test_megatron_layers_run_the_shipped_math():
    """One implementation: the Megatron layers and kernels import the very modules the export copies."""
    import megatron_moe_ext.kernels.product_key_core as core
    import megatron_moe_ext.layers.product_key_router as router
    from megatron_moe_ext.kernels import peer_experts, peer_reference, product_keys
    from megatron_moe_ext.layers import peer, query_norm

    shipped = {os.path.realpath(p) for p in CODE_FILES}
    for module in (core, peer_reference, query_norm):
        assert os.path.realpath(module.__file__) in shipped
    assert router.biased_topk_from_half_scores is core.biased_topk_from_half_scores
    assert router.router_gates is core.router_gates and router.product_key_log_partition is core.product_key_log_partition
    assert product_keys.topk_from_half_scores is core.topk_from_half_scores
    assert peer.peer_gates is peer_reference.peer_gates
    assert router.QueryNorm is query_norm.QueryNorm and peer.QueryNorm is query_norm.QueryNorm
    assert peer_experts.peer_experts_reference is peer_reference.peer_experts_reference


# -- config ------------------------------------------------------------------------------------------------------


def test_config_round_trips_through_json(remote, tmp_path):
    _, _, model = _model_of(VARIANTS["product_key_options_peer_options"])
    config = json.loads(json.dumps(model.config))
    assert config["auto_map"] == {
        "AutoConfig": "configuration_megatron_moe_ext.MegatronMoEExtConfig",
        "AutoModelForCausalLM": "modeling_megatron_moe_ext.MegatronMoEExtForCausalLM",
    }
    assert config["model_type"] == "megatron_moe_ext" and config["architectures"] == ["MegatronMoEExtForCausalLM"]
    cls = remote.configuration.MegatronMoEExtConfig
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    hf = cls(**fields)
    hf.save_pretrained(tmp_path)
    back = cls.from_pretrained(tmp_path).to_dict()
    for key, value in fields.items():
        assert back[key] == value, key
    assert back["model_type"] == "megatron_moe_ext"


@pytest.mark.parametrize("field, value, named", [
    ("mlp_kinds", ["moe"], "mlp_kinds"), ("normalization", "ScaleNorm", "normalization"),
    ("moe_peer_num_experts", 80, "moe_peer_num_experts"), ("num_key_value_heads", 3, "num_key_value_heads"),
    ("moe_router_num_groups", 4, "group_topk"), ("moe_pk_heads", 3, "moe_pk_heads")])
def test_config_refuses_inconsistent_values(remote, field, value, named):
    _, _, model = _model_of(VARIANTS["product_key_and_peer"])
    fields = {k: v for k, v in model.config.items() if k not in ("model_type", "architectures", "auto_map")}
    with pytest.raises(ValueError, match=named):
        remote.configuration.MegatronMoEExtConfig(**{**fields, field: value})


# -- unsupported -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_supported_variants_have_no_reasons(variant):
    assert TARGET.unsupported(_parse(VARIANTS[variant])) == []
    assert get_target("megatron_moe_ext") is TARGET and TARGET.native is False


@pytest.mark.parametrize("attr, value, flag", [
    ("multi_latent_attention", True, "--multi-latent-attention"),
    ("mtp_num_layers", 1, "--mtp-num-layers"),
    ("position_embedding_type", "yarn", "--position-embedding-type yarn"),
    ("rotary_interleaved", True, "--rotary-interleaved"),
    ("apply_layernorm_1p", True, "--apply-layernorm-1p"),
    ("attention_output_gate", True, "--attention-output-gate"),
    ("window_size", (8, 0), "--window-size"),
    ("softmax_type", "off-by-one", "--softmax-type"),
    ("use_mup", True, "--use-mup"),
    ("openai_gelu", True, "--openai-gelu"),
    ("moe_router_load_balancing_type", "sinkhorn", "sinkhorn"),
    ("moe_expert_capacity_factor", 1.0, "--moe-expert-capacity-factor"),
    ("moe_latent_size", 16, "--moe-latent-size"),
    ("moe_mlp_glu_interleave_size", 8, "--moe-mlp-glu-interleave-size"),
])
def test_unsupported_names_the_flag(attr, value, flag):
    args = _parse(VARIANTS["softmax_shared_qknorm_tied"])
    setattr(args, attr, value)
    reasons = TARGET.unsupported(args)
    assert len(reasons) == 1 and flag in reasons[0], reasons
    with pytest.raises(ValueError, match="cannot reproduce"):
        TARGET.export(args, _random_state(TARGET.config_dict(_parse(VARIANTS["softmax_shared_qknorm_tied"]),
                                                             _stub_state(args))))


def test_gelu_through_transformer_engine_activation_ops_is_refused():
    args = _parse(VARIANTS["megatron_defaults"])
    args.use_te_activation_func = True
    reasons = TARGET.unsupported(args)
    assert len(reasons) == 1 and "--use-te-activation-func" in reasons[0], reasons
    assert TARGET.unsupported(_parse([*VARIANTS["product_key_and_peer"]])) == []  # SwiGLU: not concerned


# -- export / import ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, approximate", [("megatron_defaults", "tanh"),
                                                  ("biases_exact_gelu_probs_on_input_peer_branch", "none"),
                                                  ("dense_gelu_no_positions", "none")])
def test_config_of_megatron_defaults(variant, approximate):
    """Biases, learned absolute positions and the GELU of Megatron's fused bias-GELU kernel reach the config."""
    args, state, model = _model_of(VARIANTS[variant])
    c = model.config
    assert c["add_bias_linear"] == args.add_bias_linear and c["mlp_gelu_approximate"] == approximate
    if variant == "megatron_defaults":
        assert c["add_qkv_bias"] and c["position_embedding_type"] == "learned_absolute" and c["tie_word_embeddings"]
        assert c["normalization"] == "LayerNorm" and (c["activation"], c["gated_linear_unit"]) == ("gelu", False)
        assert state["embedding.position_embeddings.weight"].shape == (c["max_position_embeddings"], 64)
        for name in ("decoder.layers.0.self_attention.linear_proj.bias", "decoder.layers.0.mlp.linear_fc2.bias",
                     "decoder.layers.1.mlp.router.bias", "decoder.layers.1.mlp.experts.experts.linear_fc1.bias",
                     "decoder.layers.1.mlp.linear_fc1.layer_norm_bias", "decoder.final_layernorm.bias"):
            assert name in state, name
        assert state["decoder.layers.1.mlp.experts.experts.linear_fc2.bias"].shape == (4, 64)




@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_import_is_the_identity_on_tensors_and_flags_rebuild_the_config(variant):
    _args, state, model = _model_of(VARIANTS[variant])
    assert set(model.tensors) == set(state)
    assert all(model.tensors[n] is state[n] for n in state)  # no transform: the canonical state on disk
    assert model.code_files == list(CODE_FILES) and all(os.path.isabs(p) for p in model.code_files)
    config = json.loads(json.dumps(model.config))
    flags, canonical = TARGET.import_model(config, model.tensors)
    assert set(canonical) == set(state)
    for name, tensor in state.items():
        assert canonical[name].dtype == tensor.dtype and torch.equal(canonical[name], tensor), name
    for banned in ("--tokenizer-type", "--vocab-size", "--tensor-model-parallel-size", "--expert-model-parallel-size",
                   "--seq-length", "--make-vocab-size-divisible-by"):
        assert banned not in flags
    # The flags build the same architecture: parsed by the train entry's parser, they export the same config.
    again = TARGET.config_dict(_parse(flags), state)
    assert again == model.config


def test_tied_output_equal_to_embedding_is_dropped_and_export_refuses_wrong_tensors():
    args, state, model = _model_of(VARIANTS["softmax_shared_qknorm_tied"])
    assert model.config["tie_word_embeddings"] and "output_layer.weight" not in model.tensors
    with_output = {**state, "output_layer.weight": state["embedding.word_embeddings.weight"].clone()}
    assert set(TARGET.export(args, with_output).tensors) == set(state)
    with pytest.raises(ValueError, match="differs"):
        TARGET.export(args, {**state, "output_layer.weight": torch.zeros_like(state["embedding.word_embeddings.weight"])})
    extra = {**state, "decoder.layers.0.mlp.router.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match="unexpected decoder.layers.0.mlp.router.bias"):
        TARGET.export(args, extra)
    missing = {k: v for k, v in state.items() if not k.endswith("q_layernorm.weight")}
    with pytest.raises(ValueError, match="missing"):
        TARGET.import_model(model.config, missing)
    with pytest.raises(ValueError, match="model_type"):
        TARGET.import_model({**model.config, "model_type": "qwen3_moe"}, state)


# -- the remote model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_remote_model_holds_exactly_the_expected_tensors(remote, variant):
    _, state, model = _model_of(VARIANTS[variant])
    hf = _build(remote, model.config)
    names = dict(hf.state_dict())
    if model.config["tie_word_embeddings"]:
        assert hf.output_layer.weight is hf.embedding.word_embeddings.weight
        names.pop("output_layer.weight")
    assert {n: tuple(t.shape) for n, t in names.items()} == expected_tensors(model.config)
    hf.load_state_dict(state, strict=not model.config["tie_word_embeddings"])


@pytest.mark.parametrize("variant", ["product_key_options_peer_options", "softmax_shared_qknorm_tied",
                                     "sigmoid_groups_bias_squared_relu", "megatron_defaults"])
def test_cached_decoding_equals_full_forwards(remote, variant):
    _, state, model = _model_of(VARIANTS[variant], seed=3)
    hf = _build(remote, model.config)
    hf.load_state_dict(state, strict=False)
    tokens_BS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_BSV = hf(tokens_BS, use_cache=False).logits
        out = hf(tokens_BS[:, :7], use_cache=True)
        steps = [out.logits]
        for s in range(7, 12):
            out = hf(tokens_BS[:, s:s + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full_BSV).abs().max().item() < 1e-5
    assert torch.isfinite(full_BSV).all() and full_BSV.std() > 0
    # generate() hands the cache over under its own keyword (``cache`` since transformers 5.25): greedy tokens
    # equal those of full forwards without a cache.
    with torch.no_grad():
        greedy_BS = hf.generate(tokens_BS[:, :7], attention_mask=torch.ones_like(tokens_BS[:, :7]), max_new_tokens=4,
                                min_new_tokens=4, do_sample=False, pad_token_id=0)
        want_BS = tokens_BS[:, :7]
        for _ in range(4):
            want_BS = torch.cat([want_BS, hf(want_BS, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy_BS, want_BS)


@pytest.mark.parametrize("options", [
    {"score": "softmax", "pre_softmax": False},
    {"score": "softmax", "pre_softmax": True, "scaling": 1.5},
    {"score": "sigmoid", "bias": True, "groups": (4, 2), "scaling": 2.5},
    {"score": "sigmoid", "groups": (2, 1)},
    {"score": "sqrtsoftplus", "bias": True},
    {"score": "sigmoid", "topk": 1},
    {"score": "softmax", "router_bias": True},
    {"score": "sigmoid", "bias": True, "router_bias": True},
])
def test_topk_router_equals_megatrons_routing_function(remote, options):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    E, h, T = 8, 16, 40
    k = options.get("topk", 4)
    groups, group_topk = options.get("groups", (None, None))
    cfg = remote.configuration.MegatronMoEExtConfig(
        hidden_size=h, num_hidden_layers=1, mlp_kinds=["moe"], num_experts=E, moe_ffn_hidden_size=8,
        moe_router_topk=k, moe_router_score_function=options["score"],
        moe_router_pre_softmax=options.get("pre_softmax", False),
        moe_router_topk_scaling_factor=options.get("scaling"), moe_router_enable_expert_bias=options.get("bias", False),
        moe_router_num_groups=groups, moe_router_group_topk=group_topk, moe_router_dtype="fp32",
        add_bias_linear=options.get("router_bias", False))
    router = remote.modeling.TopKRouter(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, h, generator=gen))
        if router.bias is not None:  # Megatron's Router: added to the logits, before the score function
            router.bias.copy_(torch.randn(E, generator=gen))
        if router.expert_bias is not None:
            router.expert_bias.copy_(0.3 * torch.randn(E, generator=gen))
    x_Th = torch.randn(T, h, generator=gen)
    with torch.no_grad():
        probs_TK, ids_TK = router(x_Th)
        logits_TE = x_Th @ router.weight.t() + (0 if router.bias is None else router.bias)
        want_TE, map_TE = topk_routing_with_score_function(
            logits_TE, k, use_pre_softmax=cfg.moe_router_pre_softmax, num_groups=groups,
            group_topk=group_topk, scaling_factor=cfg.moe_router_topk_scaling_factor, score_function=options["score"],
            expert_bias=router.expert_bias)
    got_TE = torch.zeros(T, E).scatter(1, ids_TK, probs_TK)
    assert torch.equal(got_TE != 0, map_TE)
    assert (got_TE - want_TE).abs().max().item() < 1e-6


# -- product-key router and PEER against our Megatron layers -------------------------------------------------------

# Both with Megatron's add_bias_linear: the query projections carry query_bias, which the comparison sets nonzero.
QUERY_BIAS_LAYERS = dict(
    num_moe_experts=18, moe_router_topk=4, moe_router_type="product_key", moe_pk_heads=2, moe_pk_key_dim=16,
    moe_pk_query_norm="rmsnorm", moe_expert_backend="grouped", moe_peer_num_experts=64, moe_peer_heads=2,
    moe_peer_topk=4, moe_peer_key_dim=8, moe_peer_layers="2", moe_peer_query_norm="layernorm", add_bias_linear=True,
)


def _our_layers_with_query_bias() -> dict:
    """Our ProductKeyRouter and PEERLayer (one gloo rank: they need Megatron's process groups) in eval, with
    random query biases and query-norm affines: their states, an input [S, B, h] and their outputs."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_moe_ext.layers.peer import PEERLayer
    from megatron_moe_ext.layers.product_key_router import ProductKeyRouter
    from megatron_moe_ext.testing.tiny import initialize_parallel, tiny_config

    initialize_parallel(seed=2)
    config = tiny_config(**QUERY_BIAS_LAYERS)
    router = ProductKeyRouter(config, pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    peer = PEERLayer(config)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in (router, peer):
            module.query_bias.copy_(torch.randn(module.query_bias.shape, generator=gen))
            module.query_norm.weight.copy_(1.0 + 0.2 * torch.randn(module.query_norm.weight.shape, generator=gen))
    router.eval()
    peer.eval()
    x_SBh = torch.randn(6, 2, config.hidden_size, generator=gen)
    with torch.no_grad():
        probs_TN, map_TN = router(x_SBh)
        out_SBh, _ = peer(x_SBh)
    return {"x_SBh": x_SBh, "router_state": dict(router.state_dict()), "peer_state": dict(peer.state_dict()),
            "probs_TN": probs_TN, "map_TN": map_TN, "peer_SBh": out_SBh}


def test_remote_product_key_router_and_peer_apply_the_query_bias_as_our_layers(remote):
    from megatron_moe_ext.testing import run_distributed

    (ours,) = run_distributed(_our_layers_with_query_bias, 1)
    L = QUERY_BIAS_LAYERS
    cfg = remote.configuration.MegatronMoEExtConfig(
        hidden_size=32, num_hidden_layers=2, mlp_kinds=["moe", "peer"], num_experts=L["num_moe_experts"],
        moe_ffn_hidden_size=8, moe_router_topk=L["moe_router_topk"], moe_router_type="product_key",
        moe_pk_heads=L["moe_pk_heads"], moe_pk_key_dim=L["moe_pk_key_dim"], moe_pk_query_norm=L["moe_pk_query_norm"],
        moe_peer_num_experts=L["moe_peer_num_experts"], moe_peer_heads=L["moe_peer_heads"],
        moe_peer_topk=L["moe_peer_topk"], moe_peer_key_dim=L["moe_peer_key_dim"],
        moe_peer_query_norm=L["moe_peer_query_norm"], add_bias_linear=True)
    router, peer = remote.modeling.ProductKeyRouter(cfg).eval(), remote.modeling.PEERLayer(cfg).eval()
    peer.linear_fc1.norm = lambda x: x  # the pre-MLP norm, which Megatron applies outside the PEER layer
    for module, state in ((router, ours["router_state"]), (peer, ours["peer_state"])):
        names = set(module.state_dict()) - {"linear_fc1.layer_norm_weight"}
        assert "query_bias" in names and names <= set(state), sorted(names - set(state))
        module.load_state_dict({n: state[n] for n in names}, strict=False)
    x_SBh = ours["x_SBh"]
    T, N = x_SBh.shape[0] * x_SBh.shape[1], L["num_moe_experts"]

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            probs_TK, ids_TK = router(x_SBh.reshape(T, -1))
            peer_BSh = peer(x_SBh.transpose(0, 1))
        return torch.zeros(T, N).scatter(1, ids_TK, probs_TK), peer_BSh.transpose(0, 1)

    probs_TN, peer_SBh = outputs()
    assert torch.equal(probs_TN != 0, ours["map_TN"])
    torch.testing.assert_close(probs_TN, ours["probs_TN"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(peer_SBh, ours["peer_SBh"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # negative control: without the bias the remote modules differ from our layers
        router.query_bias.zero_()
        peer.query_bias.zero_()
    probs_TN, peer_SBh = outputs()
    assert not torch.allclose(probs_TN, ours["probs_TN"], atol=1e-3)
    assert not torch.allclose(peer_SBh, ours["peer_SBh"], atol=1e-3)
