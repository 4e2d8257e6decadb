"""Native HF targets without running Megatron: mapping round trips on synthetic canonical states (export then import
gives the same tensors bit for bit, and flags that re-export the same model), the QKV layout under GQA with
kv_channels != hidden/heads, the exact encodings (ungated and absent shared experts) checked against transformers'
own MoE block, one refusal per feature no native target reproduces, and import-side refusals of HF configs.

Argument namespaces come from Megatron's parser plus ours (``parse_megatron_args(..., validate=False)``: no
process group), on top of the test fixture's tiny model (``model_flags``).

Legend: H hidden, E experts, F expert hidden, G query groups, Q query heads per group, D head dim.
"""

from __future__ import annotations

import argparse
import functools

import pytest
import torch

from megatron_moe_ext.checkpoint.hf_targets import get_target
from megatron_moe_ext.checkpoint.hf_targets import native_common as nc
from megatron_moe_ext.testing.random_checkpoint import model_flags

NATIVE = ("qwen3_moe", "qwen2_moe", "glm4_moe")
VOCAB_ROWS = 384
# What the import command adds to the model flags that import_model returns (tokenizer, sequence, batch).
IMPORT_BASE = ("--transformer-impl", "local", "--seq-length", "128", "--max-position-embeddings", "128",
               "--micro-batch-size", "1", "--global-batch-size", "4", "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "257")


@functools.cache
def _parse(flags: tuple[str, ...]) -> argparse.Namespace:
    from megatron_moe_ext.args import parse_megatron_args

    return parse_megatron_args(list(flags), validate=False)


def parsed(*overrides: str, tied: bool = False, **attrs) -> argparse.Namespace:
    """The fixture's tiny model + ``overrides`` as Megatron parses them; ``attrs`` set fields no flag reaches."""
    flags = model_flags(*overrides)
    if tied:
        flags = [f for f in flags if f != "--untie-embeddings-and-output-weights"]
    args = argparse.Namespace(**vars(_parse(tuple(flags))))
    for name, value in attrs.items():
        setattr(args, name, value)
    return args


def synthetic_state(args: argparse.Namespace, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A canonical state with every tensor the model of ``args`` has (names and shapes as torch_dist stores them
    for our local-spec models), random values."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    H, heads = args.hidden_size, args.num_attention_heads
    G = args.num_query_groups if args.group_query_attention else heads
    D = args.kv_channels or H // heads
    E, Fd = args.num_experts, args.ffn_hidden_size
    F, Fs = args.moe_ffn_hidden_size or Fd, args.moe_shared_expert_intermediate_size or 0
    freq = args.moe_layer_freq
    moe = [i % freq == 0 for i in range(args.num_layers)] if isinstance(freq, int) else [bool(x) for x in freq]
    state = {"embedding.word_embeddings.weight": rand(VOCAB_ROWS, H), "decoder.final_layernorm.weight": rand(H)}
    if args.untie_embeddings_and_output_weights:
        state["output_layer.weight"] = rand(VOCAB_ROWS, H)
    for i in range(args.num_layers):
        L = f"decoder.layers.{i}."
        state[L + "self_attention.linear_qkv.layer_norm_weight"] = rand(H)
        state[L + "self_attention.linear_qkv.weight"] = rand(G * (heads // G + 2) * D, H)
        if args.add_qkv_bias:
            state[L + "self_attention.linear_qkv.bias"] = rand(G * (heads // G + 2) * D)
        if args.qk_layernorm:
            state[L + "self_attention.q_layernorm.weight"] = rand(D)
            state[L + "self_attention.k_layernorm.weight"] = rand(D)
        state[L + "self_attention.linear_proj.weight"] = rand(H, heads * D)
        state[L + "mlp.linear_fc1.layer_norm_weight"] = rand(H)
        if not moe[i]:
            state[L + "mlp.linear_fc1.weight"] = rand(2 * Fd, H)
            state[L + "mlp.linear_fc2.weight"] = rand(H, Fd)
            continue
        state[L + "mlp.router.weight"] = rand(E, H)
        if args.moe_router_enable_expert_bias:
            state[L + "mlp.router.expert_bias"] = rand(E)
        if args.moe_router_noisy_gating:
            state[L + "mlp.router.noise_weight"] = rand(E, H)
        state[L + "mlp.experts.experts.linear_fc1.weight"] = rand(E, 2 * F, H)
        state[L + "mlp.experts.experts.linear_fc2.weight"] = rand(E, H, F)
        if Fs:
            state[L + "mlp.shared_experts.linear_fc1.weight"] = rand(2 * Fs, H)
            state[L + "mlp.shared_experts.linear_fc2.weight"] = rand(H, Fs)
            if args.moe_shared_expert_gate:
                state[L + "mlp.shared_experts.gate_weight"] = rand(1, H)
    return state


GQA = ("--group-query-attention", "--num-query-groups", "2", "--kv-channels", "24")
GLM = ("--moe-router-score-function", "sigmoid", "--num-experts", "8", "--moe-router-topk", "4",
       "--moe-ffn-hidden-size", "32")
ROUND_TRIPS = {
    "qwen3 dense first, noisy gating, qkv bias, tied": (
        "qwen3_moe", (*GQA, "--qk-layernorm", "--moe-layer-freq", "[0,1,1]", "--num-layers", "3",
                      "--moe-router-noisy-gating", "--add-qkv-bias"), True),
    "qwen3 pre-softmax, dense last": ("qwen3_moe", ("--qk-layernorm", "--moe-router-pre-softmax",
                                                    "--moe-layer-freq", "[1,0]"), False),
    "qwen2 gated shared, qkv bias": ("qwen2_moe", (*GQA, "--moe-shared-expert-intermediate-size", "96",
                                                   "--moe-shared-expert-gate", "--add-qkv-bias",
                                                   "--moe-router-pre-softmax"), False),
    "qwen2 ungated shared (zero gate, 2 W2)": ("qwen2_moe", ("--moe-shared-expert-intermediate-size", "96",
                                                             "--moe-layer-freq", "[0,1]"), True),
    "qwen2 no shared expert (size 0)": ("qwen2_moe", (), False),
    "qwen2 fine-grained + fine-grained shared": ("qwen2_moe", ("--moe-granularity", "2", "--moe-expansion-rate",
                                                               "2", "--moe-num-shared-experts", "1"), False),
    "glm bias, scaling, groups, shared, qk-norm, partial rope": (
        "glm4_moe", (*GLM, *GQA, "--moe-router-enable-expert-bias", "--moe-router-topk-scaling-factor", "2.5",
                     "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
                     "--moe-shared-expert-intermediate-size", "64", "--qk-layernorm", "--rotary-percent", "0.5",
                     "--moe-layer-freq", "[0,1]", "--norm-epsilon", "1e-6", "--rotary-base", "500000"), False),
    "glm no bias, no shared, top-1, qkv bias": ("glm4_moe", ("--moe-router-score-function", "sigmoid",
                                                             "--moe-router-topk", "1", "--add-qkv-bias"), True),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_export_import_round_trip(case: str) -> None:
    target_name, overrides, tied = ROUND_TRIPS[case]
    target = get_target(target_name)
    args = parsed(*overrides, tied=tied)
    assert target.unsupported(args) == []
    state = synthetic_state(args)
    hf = target.export(args, state)
    assert hf.config["model_type"] == target_name and target.native
    assert all(t.is_contiguous() or t.numel() == 0 for t in hf.tensors.values())
    # per-expert on-disk names, one (gate, up, down) triple per expert and MoE layer
    moe = nc.moe_pattern(args)
    experts = [n for n in hf.tensors if ".mlp.experts." in n]
    assert len(experts) == 3 * args.num_experts * sum(moe)
    last = f"model.layers.{len(moe) - 1 - moe[::-1].index(True)}.mlp.experts.{args.num_experts - 1}."
    assert all(last + f"{p}_proj.weight" in hf.tensors for p in ("gate", "up", "down"))
    assert ("lm_head.weight" in hf.tensors) != tied and hf.config["tie_word_embeddings"] == tied

    flags, back = target.import_model(hf.config, dict(hf.tensors))
    expected = {n: t for n, t in state.items() if not n.endswith("router.noise_weight")}
    assert back.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(back[name], t), name
    assert not any(f.startswith(("--tokenizer", "--vocab", "--tensor-model", "--expert-model", "--seq-length"))
                   for f in flags)

    # The flags rebuild the same architecture: it exports to the same config and tensors.
    args2 = argparse.Namespace(**vars(_parse((*IMPORT_BASE, *flags))))
    assert target.unsupported(args2) == []
    hf2 = target.export(args2, back)
    assert hf2.config == hf.config and hf2.tensors.keys() == hf.tensors.keys() and hf2.keep_fp32 == hf.keep_fp32
    for name, t in hf.tensors.items():
        assert torch.equal(hf2.tensors[name], t), name


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_config_is_valid_for_transformers(case: str) -> None:
    """transformers' strict config class accepts every field, and reads back the ones that matter."""
    from transformers import AutoConfig

    target_name, overrides, tied = ROUND_TRIPS[case]
    args = parsed(*overrides, tied=tied)
    config = dict(get_target(target_name).export(args, synthetic_state(args)).config)
    hf = AutoConfig.for_model(config.pop("model_type"), **config)
    assert hf.head_dim == nc.head_dim(args) and hf.num_key_value_heads == nc.query_groups(args)
    assert hf.rms_norm_eps == args.layernorm_epsilon and hf.rope_parameters["rope_theta"] == args.rotary_base
    assert hf.vocab_size == VOCAB_ROWS and hf.num_experts_per_tok == args.moe_router_topk
    if target_name == "glm4_moe":
        assert hf.rope_parameters["partial_rotary_factor"] == args.rotary_percent
        assert hf.num_nextn_predict_layers == 0 and hf.n_routed_experts == args.num_experts
        assert hf.first_k_dense_replace == nc.moe_pattern(args).index(True)
    else:
        assert hf.mlp_only_layers == [i for i, m in enumerate(nc.moe_pattern(args)) if not m]
        assert hf.norm_topk_prob == (not args.moe_router_pre_softmax) and not hf.use_sliding_window


def test_fine_grained_sizes_reach_the_config() -> None:
    args = parsed("--moe-granularity", "4", "--moe-expansion-rate", "2", "--moe-num-shared-experts", "2")
    config = get_target("qwen2_moe").export(args, synthetic_state(args)).config
    # G=4, E=2: 8 experts of 256/4 = 64, top-4, shared 2 * 64
    assert (config["num_experts"], config["moe_intermediate_size"], config["num_experts_per_tok"],
            config["shared_expert_intermediate_size"], config["intermediate_size"]) == (8, 64, 4, 128, 256)


def test_glm_writes_what_its_defaults_would_get_wrong() -> None:
    args = parsed(*GLM)
    hf = get_target("glm4_moe").export(args, synthetic_state(args))
    c = hf.config
    assert c["partial_rotary_factor"] == c["rope_parameters"]["partial_rotary_factor"] == 1.0  # GLM default: 0.5
    assert c["num_nextn_predict_layers"] == 0 and c["n_shared_experts"] == 0 and c["routed_scaling_factor"] == 1.0
    assert (c["n_group"], c["topk_group"], c["first_k_dense_replace"], c["norm_topk_prob"]) == (1, 1, 0, True)
    assert c[nc.EXPERT_BIAS_KEY] is False and c["rms_norm_eps"] == 1e-5
    bias = {n for n in hf.tensors if n.endswith("e_score_correction_bias")}
    assert hf.keep_fp32 == bias and len(bias) == args.num_layers
    assert all(not torch.count_nonzero(hf.tensors[n]) and hf.tensors[n].dtype == torch.float32 for n in bias)


# ---------------------------------------------------------------------------------------------------------
# QKV layout
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,groups", [(6, 2), (6, 6), (6, 1), (4, 2)])
def test_qkv_split_follows_query_groups(heads: int, groups: int) -> None:
    """Row (g, slot, d) of Megatron's fused QKV: slots 0..Q-1 are group g's query heads, then k, then v. HF's
    query head h belongs to KV head h // Q, so q_proj row h*D + d must be Megatron's (h // Q, h % Q, d)."""
    Q, D, H = heads // groups, 5, 7
    label = torch.tensor([[[g * 1000 + s * 10 + d for d in range(D)] for s in range(Q + 2)]
                          for g in range(groups)], dtype=torch.float64)  # [G, Q+2, D]
    qkv = label.reshape(-1, 1).expand(-1, H).clone()
    q, k, v = nc.split_qkv(qkv, heads=heads, groups=groups, dim=D)
    assert q.shape == (heads * D, H) and k.shape == v.shape == (groups * D, H)
    for h in range(heads):
        for d in range(D):
            assert q[h * D + d, 0] == (h // Q) * 1000 + (h % Q) * 10 + d
    for g in range(groups):
        for d in range(D):
            assert k[g * D + d, 0] == g * 1000 + Q * 10 + d and v[g * D + d, 0] == g * 1000 + (Q + 1) * 10 + d
    assert torch.equal(nc.merge_qkv(q, k, v, heads=heads, groups=groups, dim=D), qkv)
    bias = label.reshape(-1)
    qb, kb, vb = nc.split_qkv(bias, heads=heads, groups=groups, dim=D)
    assert torch.equal(qb, q[:, 0]) and torch.equal(kb, k[:, 0]) and torch.equal(vb, v[:, 0])
    assert torch.equal(nc.merge_qkv(qb, kb, vb, heads=heads, groups=groups, dim=D), bias)
    with pytest.raises(ValueError, match="linear_qkv has"):
        nc.split_qkv(qkv[:-1], heads=heads, groups=groups, dim=D)


def test_export_uses_kv_channels_not_hidden_over_heads() -> None:
    args = parsed(*GQA, "--qk-layernorm")  # 4 heads of 24 in 2 groups, hidden 64
    t = get_target("qwen3_moe").export(args, synthetic_state(args)).tensors
    assert t["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 24, 64)
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == t["model.layers.0.self_attn.v_proj.weight"].shape \
        == (2 * 24, 64)
    assert t["model.layers.0.self_attn.o_proj.weight"].shape == (64, 96)
    assert t["model.layers.0.self_attn.q_norm.weight"].shape == (24,)


# ---------------------------------------------------------------------------------------------------------
# The exact encodings, against transformers' own Qwen2-MoE block
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ungated_and_absent_shared_experts_are_exact_in_qwen2(dtype: torch.dtype) -> None:
    """Megatron's ungated shared expert W2 (silu(Wg x) * Wu x) written as Qwen2's gated one (zero gate, 2 W2) adds
    exactly what Megatron adds, bit for bit, and the size-0 shared expert adds exactly nothing."""
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    args = parsed("--moe-shared-expert-intermediate-size", "48", "--hidden-size", "32", "--num-attention-heads", "4",
                  "--moe-ffn-hidden-size", "16")
    state = synthetic_state(args)
    tensors = get_target("qwen2_moe").export(args, state).tensors
    common = {"hidden_size": 32, "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2,
              "norm_topk_prob": True}
    h = "model.layers.0.mlp."

    def block(shared: int) -> torch.nn.Module:
        b = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(shared_expert_intermediate_size=shared, **common)).to(dtype)
        with torch.no_grad():
            b.gate.weight.copy_(tensors[h + "gate.weight"])
            b.experts.gate_up_proj.copy_(torch.stack([torch.cat([tensors[h + f"experts.{e}.gate_proj.weight"],
                                                                 tensors[h + f"experts.{e}.up_proj.weight"]])
                                                      for e in range(4)]))
            b.experts.down_proj.copy_(torch.stack([tensors[h + f"experts.{e}.down_proj.weight"] for e in range(4)]))
            b.shared_expert_gate.weight.copy_(tensors[h + "shared_expert_gate.weight"])
            if shared:
                for p in ("gate", "up", "down"):
                    getattr(b.shared_expert, f"{p}_proj").weight.copy_(tensors[h + f"shared_expert.{p}_proj.weight"])
        return b.eval()

    x = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    fc1 = state["decoder.layers.0.mlp.shared_experts.linear_fc1.weight"].to(dtype)
    fc2 = state["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"].to(dtype)
    gate, up = fc1.chunk(2)
    megatron_shared = torch.nn.functional.linear(torch.nn.functional.silu(x @ gate.T) * (x @ up.T), fc2)
    with torch.no_grad():
        no_shared = block(0)
        _, weights, experts = no_shared.gate(x.view(-1, 32))
        routed = no_shared.experts(x.view(-1, 32), experts, weights).view_as(x)
        assert torch.equal(no_shared(x), routed)  # the size-0 shared expert adds exactly nothing
        assert torch.equal(block(48)(x), routed + megatron_shared)


# ---------------------------------------------------------------------------------------------------------
# Refusals: one reason per feature, naming the flag
# ---------------------------------------------------------------------------------------------------------
QWEN3_OK = ("--qk-layernorm",)
REFUSALS = [
    # (flags, attrs, targets, text the reason names)
    (("--moe-router-type", "product_key", "--moe-pk-key-dim", "16"), {}, NATIVE, "--moe-router-type"),
    (("--moe-peer-num-experts", "16", "--moe-peer-heads", "1", "--moe-peer-topk", "2", "--moe-peer-layers", "2"), {},
     NATIVE, "--moe-peer-num-experts"),
    (("--normalization", "LayerNorm"), {}, NATIVE, "--normalization LayerNorm"),
    (("--apply-layernorm-1p",), {}, NATIVE, "--apply-layernorm-1p"),
    ((), {"swiglu": False}, NATIVE, "--swiglu"),
    (("--squared-relu",), {"swiglu": False}, NATIVE, "--swiglu"),
    (("--position-embedding-type", "learned_absolute"), {}, NATIVE, "--position-embedding-type learned_absolute"),
    (("--rotary-interleaved",), {}, NATIVE, "--rotary-interleaved"),
    (("--rotary-percent", "0.5"), {}, ("qwen3_moe", "qwen2_moe"), "--rotary-percent 0.5"),
    (("--use-rope-scaling",), {}, NATIVE, "--use-rope-scaling"),
    ((), {"add_bias_linear": True}, NATIVE, "add_bias_linear=True (Megatron's default)"),
    (("--multi-latent-attention",), {}, NATIVE, "--multi-latent-attention"),
    (("--mtp-num-layers", "1"), {}, NATIVE, "--mtp-num-layers 1"),
    (("--attention-output-gate",), {}, NATIVE, "--attention-output-gate"),
    (("--qk-l2-norm",), {}, NATIVE, "--qk-l2-norm"),
    ((), {"softmax_type": "off-by-one"}, NATIVE, "--softmax-type off-by-one"),
    ((), {"window_size": (64, 0)}, NATIVE, "--window-size"),
    ((), {"use_mup": True}, NATIVE, "--use-mup"),
    (("--moe-expert-capacity-factor", "1.0"), {}, NATIVE, "--moe-expert-capacity-factor"),
    (("--moe-apply-probs-on-input",), {}, NATIVE, "--moe-apply-probs-on-input"),
    (("--moe-input-jitter-eps", "0.01"), {}, NATIVE, "--moe-input-jitter-eps"),
    (("--moe-router-load-balancing-type", "sinkhorn"), {}, NATIVE, "sinkhorn"),
    (("--moe-router-score-function", "sqrtsoftplus"), {}, NATIVE, "sqrtsoftplus"),
    # (Megatron's experts: ours refuse these flags at parse time, settings/experts.py)
    (("--moe-expert-backend", "megatron", "--moe-mlp-glu-interleave-size", "32"), {}, NATIVE,
     "--moe-mlp-glu-interleave-size"),
    ((), {"num_experts": None}, NATIVE, "--num-experts unset"),
    (("--moe-expert-backend", "megatron", "--moe-latent-size", "16"), {}, NATIVE, "--moe-latent-size"),
    # routing
    (("--moe-router-score-function", "sigmoid"), {}, ("qwen3_moe", "qwen2_moe"), "--moe-router-score-function sigmoid"),
    ((), {}, ("glm4_moe",), "--moe-router-score-function softmax"),
    (("--moe-router-topk-scaling-factor", "2.0"), {}, ("qwen3_moe", "qwen2_moe"), "--moe-router-topk-scaling-factor"),
    (("--moe-router-num-groups", "2", "--moe-router-group-topk", "1"), {}, ("qwen3_moe", "qwen2_moe"),
     "--moe-router-num-groups"),
    ((*GLM, "--moe-router-num-groups", "4", "--moe-router-group-topk", "1"), {}, ("glm4_moe",),
     "top-4 sum"),  # top-k 4 // group-top-k 1 = 4, HF scores groups by their top-2
    # shared experts, layers, QK-norm
    (("--moe-shared-expert-intermediate-size", "128"), {}, ("qwen3_moe",), "no shared expert"),
    ((*GLM, "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-gate"), {}, ("glm4_moe",),
     "--moe-shared-expert-gate"),
    ((*GLM, "--moe-shared-expert-intermediate-size", "48"), {}, ("glm4_moe",), "not a multiple"),
    ((*GLM, "--moe-layer-freq", "[1,0]"), {}, ("glm4_moe",), "first_k_dense_replace"),
    ((), {}, ("qwen3_moe",), "--qk-layernorm"),
    (("--qk-layernorm",), {}, ("qwen2_moe",), "--qk-layernorm"),
]


@pytest.mark.parametrize("flags,attrs,targets,text", REFUSALS, ids=[r[3] for r in REFUSALS])
def test_unsupported_names_the_flag(flags, attrs, targets, text) -> None:
    for name in targets:
        reasons = get_target(name).unsupported(parsed(*flags, **attrs))
        assert any(text in r for r in reasons), f"{name}: no reason names {text!r} in {reasons}"


def test_training_only_features_are_exact() -> None:
    """Noisy gating (eval routes on clean logits), balancing losses/metrics, aux losses, expert-bias updates, any
    expert backend, fine-grained experts and routing replay (a no-op unless an RL loop sets an action) change
    nothing a native target would have to reproduce."""
    cases = {
        "qwen3_moe": ("--qk-layernorm", "--moe-router-noisy-gating", "--moe-balance-losses", "expert",
                      "--moe-balance-metrics", "--moe-router-load-balancing-type", "aux_loss",
                      "--moe-aux-loss-coeff", "0.01", "--moe-expert-backend", "megatron",
                      "--moe-enable-routing-replay"),
        "qwen2_moe": ("--moe-granularity", "4", "--moe-expansion-rate", "2", "--moe-expert-backend", "loop",
                      "--moe-z-loss-coeff", "0.001", "--moe-router-dtype", "fp32"),
        "glm4_moe": (*GLM, "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "0.01",
                     "--moe-router-load-balancing-type", "seq_aux_loss"),
    }
    for name, flags in cases.items():
        assert get_target(name).unsupported(parsed(*flags)) == [], name


def test_auto_choice_prefers_the_exact_native_target() -> None:
    from megatron_moe_ext.checkpoint.hf_targets import choose_target

    assert choose_target(parsed("--qk-layernorm"))[0].name == "qwen3_moe"
    target, refused = choose_target(parsed("--moe-shared-expert-intermediate-size", "64"))
    assert target.name == "qwen2_moe" and any("--qk-layernorm" in r for r in refused["qwen3_moe"])
    target, refused = choose_target(parsed(*GLM, "--qk-layernorm", "--moe-shared-expert-intermediate-size", "64"))
    assert target.name == "glm4_moe" and set(refused) == {"qwen3_moe", "qwen2_moe"}


def test_auto_choice_takes_remote_code_for_megatrons_default_flags() -> None:
    """Megatron's defaults (biases, GELU, LayerNorm, learned absolute positions): every native target refuses,
    naming the bias setting and both fixes; the remote-code target reproduces them."""
    from megatron_moe_ext.checkpoint.hf_targets import choose_target

    flags = [f for f in model_flags() if f not in ("--disable-bias-linear", "--swiglu")]
    flags += ["--normalization", "LayerNorm", "--position-embedding-type", "learned_absolute"]
    args = _parse(tuple(flags))
    assert args.add_bias_linear  # no flag turns biases on: they are the default
    target, refused = choose_target(args)
    assert target.name == "megatron_moe_ext" and set(refused) == set(NATIVE)
    for name, reasons in refused.items():
        text = next(r for r in reasons if "add_bias_linear" in r)
        assert "add_bias_linear=True (Megatron's default)" in text, name
        assert "--disable-bias-linear" in text and "--target megatron_moe_ext" in text, name
        assert not any("--add-bias-linear" in r for r in reasons), name  # megatron-core 0.19 has no such flag


# ---------------------------------------------------------------------------------------------------------
# Export and import refuse what they cannot place
# ---------------------------------------------------------------------------------------------------------
def test_export_refuses_unknown_tensors_and_drops_training_only_ones() -> None:
    args = parsed("--qk-layernorm")
    state = synthetic_state(args)
    state["decoder.layers.0.mlp.router.noise_weight"] = torch.zeros(4, 64)  # noisy gating: dropped
    get_target("qwen3_moe").export(args, state)
    state["decoder.layers.0.mlp.something_new.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="something_new"):
        get_target("qwen3_moe").export(args, state)
    del state["decoder.layers.0.mlp.something_new.weight"], state["decoder.layers.1.self_attention.q_layernorm.weight"]
    with pytest.raises(ValueError, match="q_layernorm"):
        get_target("qwen3_moe").export(args, state)


def _exported(target: str, *flags: str):
    args = parsed(*flags)
    hf = get_target(target).export(args, synthetic_state(args))
    return dict(hf.config), dict(hf.tensors)


def _rope(config: dict, **extra) -> dict:
    return {**config, "rope_parameters": {**config["rope_parameters"], **extra}}


IMPORT_REFUSALS = [
    ("qwen3_moe", ("--qk-layernorm",), lambda c, t: ({**c, "use_sliding_window": True}, t), "use_sliding_window"),
    ("qwen2_moe", (), lambda c, t: ({**c, "layer_types": ["sliding_attention", "full_attention"]}, t),
     "use_sliding_window"),
    ("qwen3_moe", ("--qk-layernorm",), lambda c, t: ({**c, "hidden_act": "gelu"}, t), "hidden_act"),
    ("qwen3_moe", ("--qk-layernorm",), lambda c, t: (_rope(c, rope_type="yarn", factor=4.0), t), "rope_type"),
    ("qwen3_moe", ("--qk-layernorm",), lambda c, t: (_rope(c, rope_theta=1e4 + 0.5), t), "rope_theta"),
    ("qwen2_moe", (), lambda c, t: (_rope(c, partial_rotary_factor=0.5), t), "partial_rotary_factor"),
    ("qwen3_moe", ("--qk-layernorm", "--add-qkv-bias"),
     lambda c, t: (c, {**t, "model.layers.1.self_attn.o_proj.bias": torch.ones(64)}), "o_proj.bias is not zero"),
    ("qwen3_moe", ("--qk-layernorm",), lambda c, t: ({**c, "num_experts": 0}, t), "num_experts"),
    ("qwen3_moe", ("--qk-layernorm",), lambda c, t: (c, {**t, "model.extra.weight": torch.ones(1)}), "model.extra"),
    ("qwen3_moe", ("--qk-layernorm",), lambda c, t: ({**c, "vocab_size": 500}, t), "vocab_size"),
    ("qwen3_moe", ("--qk-layernorm",),
     lambda c, t: (c, {n: v for n, v in t.items() if n != "model.layers.1.mlp.experts.3.up_proj.weight"}),
     "experts.3.up_proj"),
    ("glm4_moe", GLM, lambda c, t: ({**c, "num_nextn_predict_layers": 1}, t), "num_nextn_predict_layers"),
    ("glm4_moe", GLM, lambda c, t: ({**c, "n_group": 4, "topk_group": 1}, t), "topk_group"),
    ("glm4_moe", GLM, lambda c, t: ({**c, "norm_topk_prob": False}, t), "norm_topk_prob"),
]


@pytest.mark.parametrize("target,flags,change,text", IMPORT_REFUSALS, ids=[r[3] for r in IMPORT_REFUSALS])
def test_import_refuses_what_megatron_cannot_build(target, flags, change, text) -> None:
    config, tensors = change(*_exported(target, *flags))
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(".", r"\.")):
        get_target(target).import_model(config, tensors)


def test_import_of_foreign_models() -> None:
    """HF models not written by us: a trained (non-zero) Qwen2 shared gate stays a gate; a GLM config without our
    marker keeps its selection bias; all groups kept means no group limit; GLM's own default partial RoPE."""
    config, tensors = _exported("qwen2_moe", "--moe-shared-expert-intermediate-size", "64")
    tensors["model.layers.0.mlp.shared_expert_gate.weight"] = torch.ones(1, 64)
    flags, state = get_target("qwen2_moe").import_model(config, tensors)
    assert "--moe-shared-expert-gate" in flags
    assert torch.equal(state["decoder.layers.0.mlp.shared_experts.linear_fc2.weight"],
                       tensors["model.layers.0.mlp.shared_expert.down_proj.weight"])  # W2 as written: 2 W2
    config, tensors = _exported("glm4_moe", *GLM)
    del config[nc.EXPERT_BIAS_KEY], config["partial_rotary_factor"], config["rope_parameters"]["partial_rotary_factor"]
    flags, state = get_target("glm4_moe").import_model({**config, "n_group": 2, "topk_group": 2}, tensors)
    assert "--moe-router-enable-expert-bias" in flags and "decoder.layers.0.mlp.router.expert_bias" in state
    assert "--moe-router-num-groups" not in flags
    assert flags[flags.index("--rotary-percent") + 1] == "0.5"
