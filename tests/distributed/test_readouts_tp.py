"""The rank-side readouts at TP=2 with sequence parallelism equal the single-rank ones: the planted model of
test_readouts_parallel.py saved as a torch_dist checkpoint (at EP=2) and loaded by analysis's own loader at
TP=2+SP and at TP=1 (Megatron's dist_checkpointing reshards). Under SP each TP rank sees its slice of the
sequence (router_rows maps it back), and the vocabulary-parallel output layer is gathered."""

from __future__ import annotations

import os

import pytest
import torch
from test_readouts_parallel import SEQ, WINDOWS, build_planted_model, run_readouts

from megatron_moe_ext.testing import run_distributed


def save_planted_checkpoint_then_read_at_tp2(save_dir: str) -> dict | None:
    """Rank function (2 ranks): build the planted model at EP=2, save it, load it at TP=2+SP, run the readouts."""
    from megatron.core import parallel_state as ps
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.global_vars import unset_global_variables

    model, args = build_planted_model(2, ("--save", save_dir, "--ckpt-format", "torch_dist"))
    args.iteration = 1
    save_checkpoint(1, [model], None, None, 0)
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    unset_global_variables()
    return run_readouts(1, tp=2, iter_dir=os.path.join(save_dir, "iter_0000001"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    ckpt = str(tmp_path_factory.mktemp("planted"))
    tp2 = run_distributed(save_planted_checkpoint_then_read_at_tp2, 2, ckpt)[0]
    tp1 = run_distributed(run_readouts, 1, 1, iter_dir=os.path.join(ckpt, "iter_0000001"))[0]
    return {"tp2": tp2, "tp1": tp1}


def test_readouts_equal_at_tp2_sp_and_tp1(runs) -> None:
    a, b = runs["tp2"], runs["tp1"]
    assert a["router_follows_label"] == b["router_follows_label"] == 1.0  # the checkpoint kept the plant
    for la, lb in zip(a["logit_lens"]["layers"], b["logit_lens"]["layers"], strict=True):
        assert la["scored_tokens"] == lb["scored_tokens"] == WINDOWS * (SEQ - 1)
        assert la["reconstruction_error"] < 1e-5
        assert la["mean_layer_correct_logit"] == pytest.approx(lb["mean_layer_correct_logit"], rel=1e-5)
        for ea, eb in zip(la["experts"], lb["experts"], strict=True):
            assert (ea["expert"], ea["tokens"], ea["best_for_tokens"]) == (eb["expert"], eb["tokens"],
                                                                          eb["best_for_tokens"])
            assert [x["id"] for x in ea["promoted"]] == [x["id"] for x in eb["promoted"]]
            assert [x["logit"] for x in ea["promoted"]] == pytest.approx([x["logit"] for x in eb["promoted"]],
                                                                          rel=1e-5, abs=1e-7)
    for la, lb in zip(a["probes"]["layers"], b["probes"]["layers"], strict=True):
        assert la["sampled_tokens"] == lb["sampled_tokens"] == 400
        for name, x in la["probes"].items():
            y = lb["probes"][name]
            assert x["test_tokens"] == y["test_tokens"] and x["majority_accuracy"] == y["majority_accuracy"]
            assert x["accuracy"] == pytest.approx(y["accuracy"], abs=1.5 / x["test_tokens"])  # one token at most
    assert a["probes"]["layers"][0]["probes"]["router/labels"]["accuracy"] == 1.0
