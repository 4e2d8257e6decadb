"""The expert-choice router inside Megatron's MoELayer (tiny GPT) at EP=2 and at TP=2 with sequence parallelism,
against one rank: losses and every gradient shard equal, thresholds synchronised.

The token group is a data-parallel rank's micro-batch, so the single-rank reference uses the same micro-batches
as each data-parallel rank: at EP=2 (data parallelism 2 for the router) one sequence per micro-batch, four
micro-batches (the two ranks' two each, in the schedule's order); at TP=2+SP (data parallelism 1) the whole
micro-batches, whose sequence shards the router all-gathers. Megatron's z-loss is on (over the N + M logits).

Both dispatchers: allgather counts the routed tokens itself, alltoall through the integration row
variable-experts-alltoall (Megatron 0.19's dropless alltoall would permute a static tokens x top-k rows).
"""

from __future__ import annotations

import io

import pytest
import torch

from megatron_moe_ext.testing import run_distributed

# Our fine-grained experts (Megatron's SequentialMLP with biases fails on CPU in its in-place bias add).
EC = {"moe_router_type": "expert_choice", "moe_token_dispatcher_type": "allgather", "moe_z_loss_coeff": 1e-3,
      "moe_expert_backend": "grouped"}
CASES = {
    "ep2_allgather_bias": ({**EC, "add_bias_linear": True}, {"ep": 2}),
    "ep2_allgather_null2": ({**EC, "moe_null_experts": 2}, {"ep": 2}),
    "ep2_alltoall_bias": ({**EC, "add_bias_linear": True, "moe_token_dispatcher_type": "alltoall"}, {"ep": 2}),
    "ep2_alltoall_null2": ({**EC, "moe_null_experts": 2, "moe_token_dispatcher_type": "alltoall"}, {"ep": 2}),
    "tp2_sp_allgather_bias": ({**EC, "add_bias_linear": True, "sequence_parallel": True}, {"tp": 2}),
    "tp2_sp_allgather_null2_capacity1.5": (
        {**EC, "moe_null_experts": 2, "moe_ec_capacity_factor": 1.5, "sequence_parallel": True}, {"tp": 2}),
}
DP = {"ep": 2, "tp": 1}  # data-parallel size of the router at each layout (2 ranks)


def _batches():
    from megatron_moe_ext.testing.tiny import make_batches

    return make_batches(2, batch_size=2, seed=7)


def _reference_batches(parallel: dict) -> list[dict[str, torch.Tensor]]:
    """The micro-batches a single rank must see to group tokens as each data-parallel rank does."""
    batches = _batches()
    dp = DP["ep"] if parallel.get("ep", 1) > 1 else DP["tp"]
    if dp == 1:
        return batches
    return [{k: v[r : r + 1].contiguous() for k, v in b.items()} for b in batches for r in range(dp)]


def _ec_buffers(model) -> dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in model.named_buffers() if "ec_threshold" in name}


def references() -> dict:
    """One single-rank reference per case (math options only: SP and the layout change no single-rank math)."""
    from megatron.core import parallel_state as ps

    from megatron_moe_ext.testing.tiny import (
        build_tiny_gpt,
        forward_backward,
        gradient_shards,
        initialize_parallel,
        tiny_config,
        wrap_ddp,
    )

    out = {}
    for name, (overrides, parallel) in CASES.items():
        initialize_parallel(seed=1234)
        math_opts = {k: v for k, v in overrides.items() if k != "sequence_parallel"}
        model = build_tiny_gpt(tiny_config(**math_opts))
        state = {n: p.detach().clone() for n, p in model.named_parameters()}
        ddp = wrap_ddp(model)
        losses = forward_backward(ddp, _reference_batches(parallel))
        grads = {n: g for n, (g, _) in gradient_shards(ddp).items()}
        out[name] = {"state": state, "losses": losses, "grads": grads, "buffers": _ec_buffers(model)}
        ps.destroy_model_parallel()
    return out


def parallel_runs(states_bytes: bytes) -> dict:
    """Every case at its layout on the two ranks, one after another (the reference weights come as one
    torch.save blob: passed as tensors, their many storages would exceed the fds a forkserver can send)."""
    states = torch.load(io.BytesIO(states_bytes))
    from megatron.core import parallel_state as ps

    from megatron_moe_ext.testing.tiny import (
        build_tiny_gpt,
        data_parallel_slice,
        forward_backward,
        gradient_shards,
        initialize_parallel,
        load_reference_weights,
        parallel_sizes,
        tiny_config,
        wrap_ddp,
    )

    out = {}
    for name, (overrides, parallel) in CASES.items():
        initialize_parallel(seed=99, **parallel)
        model = build_tiny_gpt(tiny_config(**overrides, **parallel_sizes(**parallel)))
        load_reference_weights(model, states[name])
        ddp = wrap_ddp(model)
        losses = forward_backward(ddp, [data_parallel_slice(b) for b in _batches()])
        out[name] = {
            "losses": losses, "grads": gradient_shards(ddp), "buffers": _ec_buffers(model),
            "dp_rank": ps.get_data_parallel_rank(), "dp_size": ps.get_data_parallel_world_size(),
            "tp_rank": ps.get_tensor_model_parallel_rank(),
        }
        ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def runs() -> tuple[dict, list[dict]]:
    (refs,) = run_distributed(references, 1)
    blob = io.BytesIO()
    torch.save({name: ref["state"] for name, ref in refs.items()}, blob)
    ranks = run_distributed(parallel_runs, 2, blob.getvalue())
    return refs, ranks


@pytest.mark.world_size(2)
@pytest.mark.parametrize("case", sorted(CASES))
def test_expert_choice_parallel_matches_single_rank(case: str, runs) -> None:
    from megatron_moe_ext.testing.tiny import take_shard

    refs, ranks = runs
    ref = refs[case]
    results = [r[case] for r in ranks]
    # Losses: EP (DP=2) rank r's micro-batch i is the reference's micro-batch 2i + r; TP ranks repeat them. The
    # schedule reports each micro-batch's loss divided by the number of micro-batches (4 in the EP reference, 2 here).
    for result in results:
        if result["dp_size"] == 2:
            scale = len(ref["losses"]) / len(result["losses"])
            expected = [scale * ref["losses"][2 * i + result["dp_rank"]] for i in range(len(result["losses"]))]
        else:
            expected = ref["losses"]
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected), rtol=1e-5, atol=0,
                                   msg=f"{result['losses']} vs {expected} of {ref['losses']}")
    seen = set()
    for rank, result in enumerate(results):
        for name, (grad, spec) in result["grads"].items():
            expected = take_shard(ref["grads"][name], spec)
            assert grad.shape == expected.shape, f"rank {rank} {name}: {grad.shape} vs {expected.shape}"
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {rank} gradient of {name}: {m}")
            seen.add(name)
    assert not set(ref["grads"]) - seen
    router_grads = [g for n, g in ref["grads"].items() if n.endswith("mlp.router.weight")]
    assert router_grads and all(g.abs().max() > 0 for g in router_grads)
    if CASES[case][0].get("add_bias_linear"):
        assert all(ref["grads"][n].abs().max() > 0 for n in ref["grads"] if n.endswith("mlp.router.bias"))


@pytest.mark.world_size(2)
@pytest.mark.parametrize("case", sorted(CASES))
def test_thresholds_are_synchronised(case: str, runs) -> None:
    refs, ranks = runs
    first, second = (r[case]["buffers"] for r in ranks)
    assert first.keys() == refs[case]["buffers"].keys() and len(first) == 2 * 2  # 2 layers x (thresholds, mass)
    for name in first:  # every rank holds the same buffers
        assert torch.equal(first[name], second[name]), name
    if CASES[case][1].get("tp", 1) > 1:  # DP = 1: the same updates as the single rank
        for name, value in first.items():
            torch.testing.assert_close(value, refs[case]["buffers"][name], rtol=1e-5, atol=1e-7)
    else:  # two micro-batches, each the DP mean of the two ranks' capacity scores: two EMA steps
        from megatron_moe_ext.settings.expert_choice import EC_THRESHOLD_DECAY as b

        for name, value in first.items():
            if name.endswith("ec_threshold_mass"):
                torch.testing.assert_close(value, torch.tensor([b * (1 - b) + (1 - b)]))
            else:
                assert (value > 0).all()
