"""torch_dist checkpoints through Megatron's dist_checkpointing: save at TP=2(+SP)/EP=2, load at
TP=1/EP=1, same logits."""

from __future__ import annotations

import torch
from megatron.core import dist_checkpointing

from megatron_moe_ext.testing.tiny import (
    build_tiny_gpt,
    forward_backward,
    full_logits,
    initialize_parallel,
    make_batches,
    parallel_sizes,
    tiny_config,
    wrap_ddp,
)

TRAIN = make_batches(1, batch_size=2, seed=3)
PROBE = make_batches(1, batch_size=2, seed=11)[0]


def train_and_save(ckpt_dir: str, parallel: dict, overrides: dict | None = None) -> torch.Tensor:
    initialize_parallel(seed=5, **parallel)
    config = tiny_config(sequence_parallel=parallel.get("tp", 1) > 1, **parallel_sizes(**parallel), **(overrides or {}))
    model = build_tiny_gpt(config)
    ddp = wrap_ddp(model)
    forward_backward(ddp, TRAIN)
    with torch.no_grad():  # one SGD step so the saved weights are not just the seeded init
        for param in model.parameters():
            param.sub_(0.5 * param.main_grad)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    return full_logits(model, PROBE)


def load_and_probe(ckpt_dir: str, parallel: dict, overrides: dict | None = None) -> torch.Tensor:
    initialize_parallel(seed=77, **parallel)
    config = tiny_config(sequence_parallel=parallel.get("tp", 1) > 1, **parallel_sizes(**parallel), **(overrides or {}))
    model = build_tiny_gpt(config)
    fresh = full_logits(model, PROBE)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    return torch.stack([fresh, full_logits(model, PROBE)])


def test_save_tp2_ep2_load_single_rank(tmp_path) -> None:
    from megatron_moe_ext.testing import run_distributed

    ckpt = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    saved = run_distributed(train_and_save, 2, ckpt, {"tp": 2, "ep": 2})
    torch.testing.assert_close(saved[0], saved[1])  # TP ranks gather the same logits
    (loaded,) = run_distributed(load_and_probe, 1, ckpt, {})
    fresh, restored = loaded
    assert not torch.allclose(fresh, saved[0], atol=1e-3), "fresh model already matches: test is vacuous"
    torch.testing.assert_close(restored, saved[0], rtol=1e-5, atol=1e-5)


def test_save_single_rank_load_tp2_ep2(tmp_path) -> None:
    from megatron_moe_ext.testing import run_distributed

    ckpt = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    (saved,) = run_distributed(train_and_save, 1, ckpt, {})
    loaded = run_distributed(load_and_probe, 2, ckpt, {"tp": 2, "ep": 2})
    for _fresh, restored in loaded:
        torch.testing.assert_close(restored, saved, rtol=1e-5, atol=1e-5)
