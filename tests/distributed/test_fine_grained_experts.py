"""FineGrainedExperts inside Megatron's real MoELayer: parallel parity with one rank, and
checkpoints interchangeable with Megatron's SequentialMLP across EP sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter

from megatron_moe_ext.testing import run_distributed
from test_checkpoint import load_and_probe, train_and_save
from test_parity import assert_parity, parallel_step, reference_step

# hidden 32, dense ffn 64, G=2, E=2, k0=1: 4 SwiGLU experts of 32, top-2.
FINE = dict(
    moe_granularity=2, moe_expansion_rate=2, moe_base_topk=1, gated_linear_unit=True,
    activation_func=F.silu, moe_expert_backend="grouped",
)
CASES = {
    "ep2_alltoall": ({"moe_token_dispatcher_type": "alltoall"}, {"ep": 2}),
    "ep2_allgather": ({"moe_token_dispatcher_type": "allgather"}, {"ep": 2}),
    "tp2_sp_alltoall": ({"moe_token_dispatcher_type": "alltoall", "sequence_parallel": True}, {"tp": 2}),
    "ep2_eager": ({"moe_expert_backend": "eager"}, {"ep": 2}),
}


@pytest.fixture(scope="module")
def reference() -> dict:
    (ref,) = run_distributed(reference_step, 1, FINE)
    return ref


@pytest.mark.world_size(2)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fine_grained_parallel_matches_single_rank(case: str, distributed, reference) -> None:
    extra, parallel = CASES[case]
    results = distributed(parallel_step, {**FINE, **extra}, parallel, reference["state"])
    assert_parity(reference, results)
    # Stacked expert weights really are sharded over EP (not replicated).
    if parallel.get("ep"):
        name = "decoder.layers.0.mlp.experts.linear_fc1.weight"
        shard = results[0]["grads"][name][0]
        assert shard.shape[0] == 2 and reference["grads"][name].shape[0] == 4


MEGATRON = {**FINE, "moe_expert_backend": "megatron"}


def test_checkpoint_ours_ep2_loads_into_sequential_mlp_ep1(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    saved = run_distributed(train_and_save, 2, ckpt, {"ep": 2}, FINE)
    (loaded,) = run_distributed(load_and_probe, 1, ckpt, {}, MEGATRON)
    fresh, restored = loaded
    assert not torch.allclose(fresh, saved[0], atol=1e-3)
    torch.testing.assert_close(restored, saved[0], rtol=1e-5, atol=1e-5)


def test_checkpoint_sequential_mlp_ep1_loads_into_ours_ep2(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    (saved,) = run_distributed(train_and_save, 1, ckpt, {}, MEGATRON)
    loaded = run_distributed(load_and_probe, 2, ckpt, {"ep": 2}, FINE)
    for _fresh, restored in loaded:
        torch.testing.assert_close(restored, saved, rtol=1e-5, atol=1e-5)


class _FirstExpertsRouter(TopKRouter):
    """A real TopKRouter that routes every token to experts 0 and 1 (EP rank 0's), so EP rank 1
    receives no tokens at all."""

    def routing(self, logits: torch.Tensor, padding_mask=None, **kwargs):
        logits = logits.view(-1, self.config.num_moe_experts)
        probs = torch.zeros_like(logits)
        probs[:, :2] = torch.softmax(logits[:, :2], dim=-1)
        return probs, probs > 0


def step_with_an_idle_expert_rank(parallel: dict) -> dict:
    import dataclasses

    from megatron.core.models.gpt import GPTModel

    from megatron_moe_ext.specs import _with_moe_submodules, moe_ext_gpt_block_spec
    from megatron_moe_ext.testing.tiny import (
        SEQ_LEN, VOCAB_SIZE, data_parallel_slice, forward_backward, initialize_parallel, make_batches,
        parallel_sizes, tiny_config, wrap_ddp,
    )

    initialize_parallel(seed=5, **parallel)
    config = tiny_config(**FINE, **parallel_sizes(**parallel))
    block = moe_ext_gpt_block_spec(config)
    block = dataclasses.replace(block, layer_specs=[_with_moe_submodules(s, router=_FirstExpertsRouter) for s in block.layer_specs])
    torch.manual_seed(0)
    model = GPTModel(config=config, transformer_layer_spec=block, vocab_size=VOCAB_SIZE, max_sequence_length=SEQ_LEN,
                     position_embedding_type="rope")
    ddp = wrap_ddp(model)
    losses = forward_backward(ddp, [data_parallel_slice(b) for b in make_batches(2, batch_size=2, seed=3)])
    grad = model.decoder.layers[0].mlp.experts.linear_fc1.weight.main_grad
    return {"losses": losses, "expert_grad_norm": float(grad.norm())}


@pytest.mark.world_size(2)
def test_expert_rank_without_tokens_still_joins_backward(distributed) -> None:
    """Regression: an EP rank with no routed tokens returned a graph-less empty output, skipped the
    combine all-to-all in backward and broke training with a gloo size mismatch."""
    rank0, rank1 = distributed(step_with_an_idle_expert_rank, {"ep": 2}, timeout_s=120)
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (rank0, rank1))
    assert rank0["expert_grad_norm"] > 0 and rank1["expert_grad_norm"] == 0
