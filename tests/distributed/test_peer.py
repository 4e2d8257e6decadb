"""PEER layers inside Megatron's GPTModel: TP=2, TP=2+SP and EP=2 against one rank (loss and every
gradient shard, through Megatron's schedule, DDP and finalize_model_grads), and torch_dist
checkpoints saved sharded and loaded at another parallelism (same logits), with N not divisible
by the shard count (padded tables)."""

from __future__ import annotations

import pytest
import torch

from test_checkpoint import load_and_probe, train_and_save
from test_parity import assert_parity, parallel_step, reference_step

from megatron_moe_ext.testing import run_distributed

# Layer 1: Megatron MoE (4 experts); layer 2: PEER with a dense branch. 64 = 8 x 8 experts.
PEER = dict(
    moe_peer_num_experts=64, moe_peer_heads=2, moe_peer_topk=4, moe_peer_key_dim=8,
    moe_peer_layers="2", moe_peer_shared_ffn_hidden_size=16,
)
PEER_DENSE = dict(PEER, num_moe_experts=None, moe_peer_layers="all")

CASES = {
    # Megatron refuses MoE with TP but no SP: plain TP runs PEER in both layers of a dense model.
    "tp2": (PEER_DENSE, {}, {"tp": 2}),
    "tp2_sp": (PEER, {"sequence_parallel": True}, {"tp": 2}),
    "ep2": (PEER, {"moe_peer_shard": "ep"}, {"ep": 2}),
}


@pytest.fixture(scope="module")
def peer_references() -> dict:
    cache: dict = {}

    def get(base: dict) -> dict:
        key = tuple(sorted(base.items()))
        if key not in cache:
            (cache[key],) = run_distributed(reference_step, 1, base)
        return cache[key]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_peer_parallel_matches_single_rank(case: str, peer_references) -> None:
    base, extra, parallel = CASES[case]
    ref = peer_references(base)
    results = run_distributed(parallel_step, 2, {**base, **extra}, parallel, ref["state"])
    assert_parity(ref, results)


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
