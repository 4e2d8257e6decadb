"""Granular upcycling into FineGrainedExperts: exact at step 0 where the math says it must be."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_moe_ext.testing import run_distributed
from megatron_moe_ext.testing.tiny import (
    build_tiny_gpt, full_logits, initialize_parallel, make_batches, parallel_sizes, tiny_config,
)
from megatron_moe_ext.integration.upcycling import (
    upcycle_expert_biases, upcycle_experts, upcycle_router, upcycle_state_dict,
)

PROBE = make_batches(1, batch_size=2, seed=21)[0]


def upcycle_and_compare(dense_overrides: dict, moe_overrides: dict, parallel: dict) -> dict:
    """Dense model (random weights) -> upcycled fine-grained MoE on this layout; both logits."""
    initialize_parallel(seed=3, **parallel)
    sizes = parallel_sizes(**parallel)
    dense_sizes = parallel_sizes(**{k: v for k, v in parallel.items() if k != "ep"})  # no experts to shard
    dense = build_tiny_gpt(tiny_config(num_moe_experts=None, **dense_overrides, **dense_sizes))
    with torch.no_grad():  # Megatron zero-initialises linear biases: random ones, equal on every rank
        for name, param in dense.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    moe = build_tiny_gpt(tiny_config(moe_expert_backend="grouped", **dense_overrides, **moe_overrides, **sizes))
    state = upcycle_state_dict([moe], [dense])["model"]
    moe.load_state_dict(state)
    return {"dense": full_logits(dense, PROBE), "moe": full_logits(moe, PROBE)}


RELU = {"activation_func": F.relu, "bias_activation_fusion": False}
BIASES = {"add_bias_linear": True}  # Megatron's default: QKV, output projection, fc1/fc2, router logits
CASES = {
    # (dense overrides, MoE overrides, exact?)
    "relu_g4_e2_ep2": (RELU, dict(moe_granularity=4, moe_expansion_rate=2, moe_base_topk=1), {"ep": 2}, True),
    "relu_g2_e4_topk2": (RELU, dict(moe_granularity=2, moe_expansion_rate=4, moe_base_topk=2), {}, True),
    # Megatron forces pre-softmax at top-1, so the any-activation G=1 case uses top-2 (post-softmax).
    "gelu_g1_e4_topk2": ({}, dict(moe_granularity=1, moe_expansion_rate=4, moe_base_topk=2), {"ep": 2}, True),
    # Biases: the fc1 bias split and scaled with the rows, the fc2 bias in every expert (prob-scaled, probs sum
    # to 1), the router bias tied per copy; exact at G=1 for any activation, and for ReLU at any G.
    "gelu_biases_g1_e4_topk2": (
        BIASES, dict(moe_granularity=1, moe_expansion_rate=4, moe_base_topk=2), {"ep": 2}, True,
    ),
    "relu_biases_g2_e2_topk2": (
        {**RELU, **BIASES}, dict(moe_granularity=2, moe_expansion_rate=2, moe_base_topk=2), {}, True,
    ),
    "swiglu_g4_approximate": (
        {"gated_linear_unit": True, "activation_func": F.silu}, dict(moe_granularity=4, moe_expansion_rate=2), {}, False,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_upcycled_model_reproduces_dense_logits(case: str) -> None:
    dense_overrides, moe_overrides, parallel, exact = CASES[case]
    world = max(parallel.values(), default=1)
    results = run_distributed(upcycle_and_compare, world, dense_overrides, moe_overrides, parallel)
    for result in results:
        diff = (result["moe"] - result["dense"]).abs().max().item()
        print(f"{case}: max |upcycled - dense| logits = {diff:.2e}")
        if exact:
            torch.testing.assert_close(result["moe"], result["dense"], rtol=1e-5, atol=1e-5)
        else:  # documented as approximate: close, not equal
            assert 1e-6 < diff < 1.0, diff


def test_expert_split_reassembles_the_dense_ffn() -> None:
    torch.manual_seed(0)
    fc1, fc2, x = torch.randn(2 * 8, 4), torch.randn(4, 8), torch.randn(3, 4)
    w1, w2 = upcycle_experts(fc1, fc2, granularity=4, expansion_rate=2, gated=True, scale=1.0)
    assert w1.shape == (8, 4, 4) and w2.shape == (8, 4, 2)
    gate, up = torch.chunk(fc1, 2)
    dense = (F.silu(x @ gate.t()) * (x @ up.t())) @ fc2.t()
    pieces = sum((F.silu(x @ w1[i, :2].t()) * (x @ w1[i, 2:].t())) @ w2[i].t() for i in range(4))
    torch.testing.assert_close(pieces, dense)  # one copy's G pieces sum to the dense FFN
    torch.testing.assert_close(w1[:4], w1[4:])  # copies are identical
    router = upcycle_router(torch.arange(8.0).view(8, 1), 4)
    assert router.view(-1).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_expert_biases_reassemble_the_dense_ffn() -> None:
    """Biases as Megatron's upcycling: one copy's G pieces, each weighted 1/G and its fc2 bias scaled by that
    weight, sum to the dense biased FFN when s^2 = G (ReLU); fc1 pieces keep [gate; up] for gated units."""
    torch.manual_seed(0)
    G, E, s = 4, 2, 2.0
    fc1, fc2, b1, b2, x = torch.randn(8, 4), torch.randn(4, 8), torch.randn(8), torch.randn(4), torch.randn(3, 4)
    w1, w2 = upcycle_experts(fc1, fc2, granularity=G, expansion_rate=E, gated=False, scale=s)
    pb1, pb2 = upcycle_expert_biases(b1, b2, granularity=G, expansion_rate=E, gated=False, scale=s)
    assert pb1.shape == (G * E, 2) and pb2.shape == (G * E, 4)
    dense = F.relu(x @ fc1.t() + b1) @ fc2.t() + b2
    pieces = sum((F.relu(x @ w1[i].t() + pb1[i]) / G) @ w2[i].t() + pb2[i] / G for i in range(G))
    torch.testing.assert_close(pieces, dense)
    gated_b1, _ = upcycle_expert_biases(torch.arange(8.0), b2, granularity=2, expansion_rate=1, gated=True, scale=1.0)
    assert gated_b1.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]  # [gate piece; up piece] per expert
    assert upcycle_router(torch.arange(4.0), 2).tolist() == [0, 0, 1, 1]  # a logit bias is tied per copy
