"""FP8 experts (--moe-fp8-format) inside Megatron's real MoELayer: EP=2 equals one rank.

What must be equal, and why it is: the scales of current scaling are per expert operand (tensorwise: the
expert's rows of x, its weights, its gradient rows; rowwise: each row/column of those along the GEMM's
contraction), so an expert's FP8 operands depend only on the SET of rows routed to it. With EP=2 on two
ranks (data-parallel 2), the dispatcher brings each expert the rows of both data-parallel halves: the same
rows as the single rank's expert group for the same two micro-batches, in another order; the max of a
set does not depend on the order, and each output row is computed from its own row and the expert's
weights only. The upstream gradient on the rows differs between the layouts by the data-parallel loss
scaling (a factor 2), a power of two: FP8 current scaling maps x and 2x to the same FP8 values, so the
quantized gradient operands are equal too. What differs is the float32 summation order of the weight
gradients (rows in another order, DP reduction), hence the same tolerance as the float32 parity tests
(``test_parity.assert_parity``: loss rtol 1e-5, gradients rtol 1e-4 / atol 1e-6).
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from megatron_moe_ext.testing import run_distributed
from test_parity import assert_parity, parallel_step, reference_step

# hidden 32, dense ffn 64, G=2, E=2, k0=1: 4 SwiGLU experts of 32 (FP8-aligned: H=32, F=32, F1=64), top-2.
FINE_FP8 = dict(
    moe_granularity=2, moe_expansion_rate=2, moe_base_topk=1, gated_linear_unit=True,
    activation_func=F.silu, moe_expert_backend="grouped", moe_fp8_format="hybrid",
)
CASES = {
    "ep2_alltoall_tensorwise": ({"moe_fp8_recipe": "tensorwise", "moe_token_dispatcher_type": "alltoall"}, {"ep": 2}),
    "ep2_allgather_rowwise": ({"moe_fp8_recipe": "rowwise", "moe_token_dispatcher_type": "allgather"}, {"ep": 2}),
}


@pytest.fixture(scope="module")
def references() -> dict:
    cache: dict = {}

    def get(recipe: str) -> dict:
        if recipe not in cache:
            (cache[recipe],) = run_distributed(reference_step, 1, {**FINE_FP8, "moe_fp8_recipe": recipe})
        return cache[recipe]

    return get


@pytest.mark.world_size(2)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fp8_experts_ep2_match_single_rank(case: str, distributed, references) -> None:
    extra, parallel = CASES[case]
    ref = references(extra["moe_fp8_recipe"])
    results = distributed(parallel_step, {**FINE_FP8, **extra}, parallel, ref["state"])
    assert_parity(ref, results)
    name = "decoder.layers.0.mlp.experts.linear_fc1.weight"
    assert results[0]["grads"][name][0].shape[0] == 2 and ref["grads"][name].shape[0] == 4  # really sharded


def test_fp8_reference_differs_from_the_unquantized_one(references) -> None:
    """The parity above is about FP8 numbers: the single-rank FP8 gradients are not the float32 ones."""
    import torch

    (plain,) = run_distributed(reference_step, 1, {k: v for k, v in FINE_FP8.items() if k != "moe_fp8_format"})
    name = "decoder.layers.0.mlp.experts.linear_fc1.weight"
    assert not torch.allclose(references("tensorwise")["grads"][name], plain["grads"][name], rtol=1e-3, atol=1e-5)
