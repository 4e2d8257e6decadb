"""PEER balancing on 2 gloo ranks against one rank, through Megatron's schedule, DDP and the finalize
hook: with the subkey loss on (the default candidate marginals, k' = 4 of n = 8 sub-keys per side;
the full marginals under SP), TP=2 (dense model, tokens replicated on TP ranks) and TP=2 + SP (tokens
sharded, counts all-reduced over TP) give the single rank's loss and every gradient shard; with DP=2
the step metrics (counts all-reduced over DP) equal the single rank's on the whole batch. The subkey
loss itself is per micro-batch and rank (like the router's 'expert' loss), so its DP gradient is
not the whole batch's and is not compared."""

from __future__ import annotations

import pytest
import torch

from test_parity import assert_parity, parallel_step, reference_step

from megatron_moe_ext.testing import run_distributed

PEER = dict(
    moe_peer_num_experts=64, moe_peer_heads=2, moe_peer_topk=4, moe_peer_key_dim=8,
    moe_peer_layers="2", moe_peer_shared_ffn_hidden_size=16,
    moe_balance_losses=["subkey"], moe_balance_coeffs=[0.5], moe_balance_metrics=True,
)
PEER_DENSE = dict(PEER, num_moe_experts=None, moe_peer_layers="all")

CASES = {
    "tp2_dense": (PEER_DENSE, {}, {"tp": 2}),
    "tp2_sp": (PEER, {"sequence_parallel": True}, {"tp": 2}),
}


# The default marginals in both layouts; the full ones (they share the counts' all-reduce and the loss
# scaling with the default) only under SP, the layout where the counts are all-reduced: one case fewer.
@pytest.mark.parametrize("case, marginals", [("tp2_dense", "candidates"), ("tp2_sp", "candidates"),
                                             ("tp2_sp", "full")])
def test_peer_subkey_loss_parallel_matches_single_rank(case: str, marginals: str) -> None:
    base, extra, parallel = CASES[case]
    base = {**base, "moe_peer_subkey_loss_marginals": marginals}
    (ref,) = run_distributed(reference_step, 1, base)
    results = run_distributed(parallel_step, 2, {**base, **extra}, parallel, ref["state"])
    assert_parity(ref, results)


METRICS = ("subkey_balance_loss", "max_violation", "load_entropy", "experts_used_fraction", "pk_rows_used",
           "pk_cols_used")


def _metrics_step(overrides: dict, parallel: dict, full_state: dict | None) -> dict:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from test_parity import BATCHES
    from megatron_moe_ext.testing.tiny import (
        build_tiny_gpt, data_parallel_slice, forward_backward, initialize_parallel, load_reference_weights,
        parallel_sizes, tiny_config, wrap_ddp,
    )

    initialize_parallel(seed=7, **parallel)
    model = build_tiny_gpt(tiny_config(**overrides, **parallel_sizes(**parallel)))
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    if full_state is not None:
        load_reference_weights(model, full_state)
    tracker = get_moe_metrics_tracker()
    tracker.clear()
    ddp = wrap_ddp(model)
    batches = BATCHES if full_state is None else [data_parallel_slice(b) for b in BATCHES]
    losses = forward_backward(ddp, batches)
    values = {name: tracker.metrics[name].values.clone() for name in METRICS if name in tracker.metrics}
    return {"state": state, "losses": losses, "metrics": values}


def test_peer_metrics_dp2_match_single_rank() -> None:
    (ref,) = run_distributed(_metrics_step, 1, PEER_DENSE, {}, None)
    results = run_distributed(_metrics_step, 2, PEER_DENSE, {}, ref["state"])
    assert set(ref["metrics"]) == set(METRICS), sorted(ref["metrics"])
    per_mb = torch.tensor([r["losses"] for r in results]).mean(dim=0)
    torch.testing.assert_close(per_mb, torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    for r in results:
        for name in METRICS[1:]:  # step metrics: from counts all-reduced over DP
            torch.testing.assert_close(r["metrics"][name], ref["metrics"][name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name: f"{n}: {m}")
        assert bool((r["metrics"]["subkey_balance_loss"] > 0).all())  # recorded on every PEER layer
