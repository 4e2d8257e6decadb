"""PEER layers inside Megatron's GPTModel: TP=2, TP=2+SP and EP=2 against one rank (loss and every
gradient shard, through Megatron's schedule, DDP and finalize_model_grads), and torch_dist
checkpoints saved sharded and loaded at another parallelism (same logits), with N not divisible
by the shard count (padded tables). With Megatron's default add_bias_linear the query projection
carries a bias (``query_bias``), checked the same ways."""

from __future__ import annotations

import pytest
import torch

from test_checkpoint import PROBE, load_and_probe, train_and_save
from test_parity import assert_parity, parallel_step, reference_step
from test_product_key_router import init_query_bias_nonzero, reference_step_with_query_bias

from megatron_moe_ext.testing import run_distributed

# Layer 1: Megatron MoE (4 experts); layer 2: PEER with a dense branch. 64 = 8 x 8 experts.
PEER = dict(
    moe_peer_num_experts=64, moe_peer_heads=2, moe_peer_topk=4, moe_peer_key_dim=8,
    moe_peer_layers="2", moe_peer_shared_ffn_hidden_size=16,
)
PEER_DENSE = dict(PEER, num_moe_experts=None, moe_peer_layers="all")
# Megatron's default add_bias_linear: PEER's query bias (rmsnorm: batch norm would cancel it) next to
# Megatron's attention, MLP and expert biases. Layer 1's experts are ours ('grouped'): Megatron's
# SequentialMLP with biases fails on one expert-TP rank in megatron-core 0.19.2 (fc2's bias added in place
# to the output of its reduce, "Output 0 of _ReduceFromModelParallelRegion is a view").
PEER_BIAS = dict(PEER, add_bias_linear=True, moe_peer_query_norm="rmsnorm", moe_expert_backend="grouped")

CASES = {
    # Megatron refuses MoE with TP but no SP: plain TP runs PEER in both layers of a dense model.
    "tp2": (PEER_DENSE, {}, {"tp": 2}),
    "tp2_sp": (PEER, {"sequence_parallel": True}, {"tp": 2}),
    "ep2": (PEER, {"moe_peer_shard": "ep"}, {"ep": 2}),
    "tp2_sp_bias": (PEER_BIAS, {"sequence_parallel": True}, {"tp": 2}),
    "ep2_bias": (PEER_BIAS, {"moe_peer_shard": "ep"}, {"ep": 2}),
}


@pytest.fixture(scope="module")
def peer_references() -> dict:
    cache: dict = {}

    def get(base: dict) -> dict:
        key = tuple(sorted(base.items()))
        if key not in cache:
            step = reference_step_with_query_bias if base.get("add_bias_linear") else reference_step
            (cache[key],) = run_distributed(step, 1, base)
        return cache[key]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_peer_parallel_matches_single_rank(case: str, peer_references) -> None:
    base, extra, parallel = CASES[case]
    ref = peer_references(base)
    results = run_distributed(parallel_step, 2, {**base, **extra}, parallel, ref["state"])
    assert_parity(ref, results)
    bias_grads = [g for name, g in ref["grads"].items() if name.endswith("mlp.query_bias")]
    assert len(bias_grads) == (1 if base.get("add_bias_linear") else 0)  # only layer 2 is PEER
    assert all(g.abs().max() > 0 for g in bias_grads)


# 81 = 9 x 9 experts: 41 rows per rank at 2 shards, one padding row.
ODD = dict(PEER, moe_peer_num_experts=81)
RESHARD = {
    "tp2_to_tp1": ({"tp": 2}, dict(ODD), {}, dict(ODD)),
    "ep2_to_tp2": ({"ep": 2}, dict(ODD, moe_peer_shard="ep"), {"tp": 2}, dict(ODD)),
}


@pytest.mark.parametrize("case", sorted(RESHARD))
def test_peer_checkpoint_reshards(case: str, tmp_path) -> None:
    save_parallel, save_overrides, load_parallel, load_overrides = RESHARD[case]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    saved = run_distributed(train_and_save, 2, str(ckpt), save_parallel, save_overrides)
    nproc = 2 if load_parallel else 1
    loaded = run_distributed(load_and_probe, nproc, str(ckpt), load_parallel, load_overrides)
    for fresh, restored in loaded:
        assert not torch.allclose(fresh, saved[0], atol=1e-3), "fresh model already matches: test is vacuous"
        torch.testing.assert_close(restored, saved[0], rtol=1e-5, atol=1e-5)


def train_and_save_with_query_bias(ckpt_dir: str, parallel: dict, overrides: dict) -> torch.Tensor:
    """``train_and_save`` from nonzero query biases (one step from zero would move them too little for
    the negative control)."""
    init_query_bias_nonzero()
    return train_and_save(ckpt_dir, parallel, overrides)


def load_and_probe_without_query_bias(ckpt_dir: str, parallel: dict, overrides: dict) -> dict:
    """``load_and_probe``'s logits, then those of the loaded model with its PEER query biases zeroed."""
    from megatron.core import dist_checkpointing

    from megatron_moe_ext.testing.tiny import build_tiny_gpt, full_logits, initialize_parallel, parallel_sizes, tiny_config

    initialize_parallel(seed=77, **parallel)
    model = build_tiny_gpt(tiny_config(sequence_parallel=parallel.get("tp", 1) > 1, **parallel_sizes(**parallel),
                                       **overrides))
    fresh = full_logits(model, PROBE)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    restored = full_logits(model, PROBE)
    biases = [p for name, p in model.named_parameters() if name.endswith("mlp.query_bias")]
    with torch.no_grad():
        for p in biases:
            p.zero_()
    return {"fresh": fresh, "restored": restored, "without_query_bias": full_logits(model, PROBE),
            "query_biases": len(biases)}


def test_peer_query_bias_checkpoint_reshards(tmp_path) -> None:
    """add_bias_linear: trained at TP=2+SP, loaded at EP=2 (query bias replicated, tables resharded)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    odd_bias = dict(PEER_BIAS, moe_peer_num_experts=81)
    saved = run_distributed(train_and_save_with_query_bias, 2, str(ckpt), {"tp": 2}, odd_bias)
    loaded = run_distributed(load_and_probe_without_query_bias, 2, str(ckpt), {"ep": 2},
                             dict(odd_bias, moe_peer_shard="ep"))
    for got in loaded:
        assert got["query_biases"] == 1
        assert not torch.allclose(got["fresh"], saved[0], atol=1e-3), "fresh model already matches: test is vacuous"
        torch.testing.assert_close(got["restored"], saved[0], rtol=1e-5, atol=1e-5)
        # Negative control: the trained query bias is part of the saved model's logits.
        assert not torch.allclose(got["without_query_bias"], saved[0], atol=1e-3)


def _layer_against_reference(norm: str, gate: str, activation: str, query_bias: bool = False) -> dict:
    """PEERLayer (single rank) vs the formula written out with brute-force top-k over all N keys; with
    ``query_bias`` (add_bias_linear) the query is x W_q^T + b_q before the norm."""
    from megatron_moe_ext.layers.peer import PEERLayer
    from megatron_moe_ext.testing.tiny import initialize_parallel, tiny_config

    initialize_parallel(seed=3)
    config = tiny_config(
        num_moe_experts=None, moe_peer_num_experts=36, moe_peer_heads=3, moe_peer_topk=4, moe_peer_key_dim=6,
        moe_peer_layers="all", moe_peer_query_norm=norm, moe_peer_gate=gate, moe_peer_activation=activation,
        moe_peer_backend="chunked", moe_peer_chunk_pairs=10, add_bias_linear=query_bias,
    )
    layer = PEERLayer(config)
    result: dict = {"param_names": sorted(n for n, _ in layer.named_parameters())}
    if query_bias:
        result["init_bias"] = layer.query_bias.detach().clone()
        with torch.no_grad():  # zero-initialised: a nonzero value, or the check is vacuous
            layer.query_bias.uniform_(-1.0, 1.0)
    S, B, h = 5, 3, config.hidden_size
    x = torch.randn(S, B, h, requires_grad=True)
    out, bias = layer(x)
    assert bias is None and out.shape == (S, B, h)
    dy = torch.randn_like(out)
    params = [layer.query_weight, layer.row_keys, layer.col_keys, layer.u, layer.v]
    if query_bias:
        params.append(layer.query_bias)
        with torch.no_grad():  # negative control: the same layer with its query bias removed
            saved = layer.query_bias.clone()
            layer.query_bias.zero_()
            result["without_bias"] = layer(x)[0].detach()
            layer.query_bias.copy_(saved)
    grads = torch.autograd.grad((out * dy).sum(), [x, *params])

    H, D, k, n = 3, 6, 4, 6
    x_Th = x.reshape(-1, h)
    q_pre = x_Th @ layer.query_weight.t() + (layer.query_bias if query_bias else 0.0)
    q = q_pre.view(-1, H, D)
    if norm == "layernorm":
        q = torch.nn.functional.layer_norm(q, (D,)) * layer.query_norm.weight + layer.query_norm.bias
    keys_HND = torch.cat([layer.row_keys.unsqueeze(2).expand(H, n, n, D // 2),
                          layer.col_keys.unsqueeze(1).expand(H, n, n, D // 2)], dim=-1).reshape(H, n * n, D)
    scores_THN = torch.einsum("thd,hnd->thn", q, keys_HND)
    top_THk, ids_THk = scores_THN.topk(k, dim=-1)
    g = torch.softmax(top_THk, -1) if gate == "softmax" else torch.sigmoid(top_THk)
    act = {"gelu": torch.nn.functional.gelu, "relu": torch.nn.functional.relu, "silu": torch.nn.functional.silu}[activation]
    z = act(torch.einsum("thkd,td->thk", layer.u[ids_THk], x_Th)) * g
    ref = torch.einsum("thk,thkd->td", z, layer.v[ids_THk]).view(S, B, h)
    ref_grads = torch.autograd.grad((ref * dy).sum(), [x, *params, q_pre])
    if query_bias:  # the bias gradient is the queries' gradient summed over tokens
        result["query_grad_sum"] = ref_grads[-1].sum(0)
    ref_grads = ref_grads[:-1]
    result.update(out=(out.detach(), ref.detach()), grads=[(a, b) for a, b in zip(grads, ref_grads)])
    return result


FORMULA_CASES = [("none", "softmax", "gelu"), ("layernorm", "sigmoid", "relu")]
BIAS_FORMULA_CASES = [("none", "sigmoid", "silu"), ("layernorm", "softmax", "gelu")]


def _single_rank_runs() -> dict:
    """The single-rank cases of this file in one rank process (a process start costs more than a case);
    Megatron's parallel state is rebuilt per case, as a fresh process would have it."""
    from megatron.core import parallel_state as ps

    results: dict = {}
    for case in FORMULA_CASES:
        results[case] = _layer_against_reference(*case)
        ps.destroy_model_parallel()
    for case in BIAS_FORMULA_CASES:
        results[(*case, "bias")] = _layer_against_reference(*case, query_bias=True)
        ps.destroy_model_parallel()
    results["optimizer_groups"] = _optimizer_groups()
    return results


@pytest.fixture(scope="module")
def single_rank_runs() -> dict:
    (results,) = run_distributed(_single_rank_runs, 1)
    return results


@pytest.mark.parametrize("norm,gate,activation", FORMULA_CASES)
def test_layer_equals_brute_force_formula(single_rank_runs: dict, norm: str, gate: str, activation: str) -> None:
    result = single_rank_runs[(norm, gate, activation)]
    torch.testing.assert_close(*result["out"], rtol=1e-5, atol=1e-6)
    for name, (got, want) in zip(["x", "query", "row_keys", "col_keys", "u", "v"], result["grads"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")
    # Without add_bias_linear there is no query bias: checkpoints of such runs load unchanged.
    assert "query_bias" not in result["param_names"]


@pytest.mark.parametrize("norm,gate,activation", BIAS_FORMULA_CASES)
def test_layer_with_query_bias_equals_brute_force_formula(single_rank_runs: dict, norm: str, gate: str,
                                                          activation: str) -> None:
    result = single_rank_runs[(norm, gate, activation, "bias")]
    # A bias on the query only: the single-neuron experts act(u . x) v have none.
    assert "query_bias" in result["param_names"] and not any(n.startswith(("u", "v")) and n not in ("u", "v")
                                                              for n in result["param_names"])
    torch.testing.assert_close(result["init_bias"], torch.zeros_like(result["init_bias"]), rtol=0, atol=0)
    torch.testing.assert_close(*result["out"], rtol=1e-5, atol=1e-6)
    names = ["x", "query", "row_keys", "col_keys", "u", "v", "query_bias"]
    for name, (got, want) in zip(names, result["grads"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")
    torch.testing.assert_close(result["grads"][-1][0], result["query_grad_sum"], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(result["without_bias"], result["out"][0], atol=1e-3)  # negative control


def _optimizer_groups() -> list[dict]:
    import argparse

    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.training import training

    from megatron_moe_ext.integration import install
    from megatron_moe_ext.testing.tiny import build_tiny_gpt, initialize_parallel, tiny_config, wrap_ddp

    initialize_parallel(seed=4)
    config = tiny_config(**PEER, moe_peer_table_lr_mult=10.0, moe_peer_table_wd_mult=0.0)
    model = wrap_ddp(build_tiny_gpt(config))
    install(("training",), only=("peer-optimizer-groups",))
    args = argparse.Namespace(  # what the wrapper and Megatron's optimizer config read of the run's args
        lr=1e-3, min_lr=1e-4, weight_decay=0.1, optimizer="adam", bf16=False, fp16=False, num_layers=config.num_layers,
        moe_peer_num_experts=64, moe_peer_table_lr_mult=10.0, moe_peer_table_wd_mult=0.0,
    )
    config, overrides = training.get_megatron_optimizer_config(args)
    optimizer = get_megatron_optimizer(config, [model], config_overrides=overrides)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.param_groups:
            groups.append({"names": [names.get(id(p), "?") for p in group["params"]],
                           "max_lr": group["max_lr"], "min_lr": group["min_lr"], "wd_mult": group["wd_mult"]})
    return groups


def test_table_learning_rate_and_weight_decay_groups(single_rank_runs: dict) -> None:
    groups = single_rank_runs["optimizer_groups"]
    tables = [g for g in groups if any(n.endswith((".mlp.u", ".mlp.v")) for n in g["names"])]
    assert tables and all(n.endswith((".mlp.u", ".mlp.v")) for g in tables for n in g["names"])
    for group in tables:
        assert (group["max_lr"], group["min_lr"], group["wd_mult"]) == pytest.approx((1e-2, 1e-3, 0.0))
    others = [g for g in groups if g not in tables and g["names"]]
    assert others and all(g["max_lr"] == pytest.approx(1e-3) for g in others)
