"""`megatron-moe-ext train --moe-router-type expert_choice` end to end: Megatron's defaults (biased linears), EP=2 on
2 gloo ranks, the evaluation log with the batch-choice loss next to the causal-rule loss, the routing metrics in the
training log, a torch_dist save and a resume that restores the tracked thresholds; bad input refused before any rank
starts."""

from __future__ import annotations

import os
import re

import pytest
from conftest import shared_cache
from test_train import losses, run_launcher, train

from megatron_moe_ext.settings.expert_choice import EC_THRESHOLD_DECAY

MICRO_BATCHES = 2  # per iteration and data-parallel rank: global 8 / (micro 2 x DP 2)


def model_flags() -> list[str]:
    """A tiny model with Megatron's defaults (no --disable-bias-linear: the router has its bias) on the embedded
    corpus given as --data-path, so that the embedded default model's flags are not prepended."""
    from megatron_moe_ext.training import data as data_lib

    prefix = data_lib.build_default_dataset(os.path.join(shared_cache(), "data"))
    return [
        "--data-path", prefix, "--split", "98,1,1", "--tokenizer-type", "NullTokenizer", "--vocab-size",
        str(data_lib.VOCAB_SIZE), "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256",
        "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings", "32", "--num-experts", "4",
        "--moe-router-topk", "2", "--expert-model-parallel-size", "2", "--micro-batch-size", "2",
        "--global-batch-size", "8", "--lr", "1e-3", "--train-iters", "6", "--lr-warmup-iters", "1", "--eval-interval",
        "3", "--eval-iters", "1", "--save-interval", "3", "--log-interval", "1", "--ckpt-format", "torch_dist",
        "--moe-router-type", "expert_choice", "--moe-token-dispatcher-type", "allgather", "--moe-z-loss-coeff", "1e-3",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("expert_choice")
    flags = model_flags()
    first = train(tmp, *flags, "--save", "ckpt", "--exit-interval", "3", "--ext-loss-log", "loss")
    resumed = train(tmp, *flags, "--save", "ckpt", "--load", "ckpt", "--ext-loss-log", "loss")
    return {"tmp": tmp, "first": first.stdout, "resumed": resumed.stdout}


_VALIDATION = re.compile(
    r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+) .*?lm loss \(batch choice\) value: ([0-9.E+-]+)"
)


def test_eval_log_reports_batch_choice_next_to_causal_rule(runs) -> None:
    found = {int(it): (float(causal), float(batch)) for it, causal, batch in _VALIDATION.findall(runs["first"] + runs["resumed"])}
    assert sorted(found) == [3, 6], found
    for causal, batch in found.values():
        assert 0 < causal < 10 and 0 < batch < 10
        assert causal != batch  # two forwards with different routing rules
    for line in runs["first"].splitlines():
        if " iteration        2/" in line:
            assert "active_experts: 2.00" in line and "ec_unrouted_fraction:" in line, line
            break
    else:
        pytest.fail("no training log line for iteration 2")


def test_resume_restores_the_thresholds(runs) -> None:
    from megatron_moe_ext.checkpoint.torch_dist import read_model_state

    ckpt = runs["tmp"] / "ckpt"
    assert "iteration        4/       6" in runs["resumed"], "the resumed run did not start at iteration 4"
    masses = {}
    for it in (3, 6):
        state = read_model_state(str(ckpt / f"iter_{it:07d}"), 2)
        for layer in (0, 1):
            prefix = f"decoder.layers.{layer}.mlp.router."
            assert state[prefix + "ec_thresholds"].shape == (4,) and (state[prefix + "ec_thresholds"] > 0).all()
            masses[(it, layer)] = float(state[prefix + "ec_threshold_mass"])
    # One EMA step per training micro-batch: after n steps the correction mass is 1 - b^n. Without restoring the
    # buffers the resumed run would restart from 0 (iteration 6 would hold the mass of 6 steps, not 12).
    for (it, _), mass in masses.items():
        assert mass == pytest.approx(1 - EC_THRESHOLD_DECAY ** (it * MICRO_BATCHES), rel=1e-5), masses
    for rank in (0, 1):
        assert sorted(losses(runs["tmp"] / "loss", rank)) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--moe-ec-capacity-factor", "0"], "--moe-ec-capacity-factor 0.0"),
        (["--moe-ec-capacity-factor", "-0.5"], "--moe-ec-capacity-factor -0.5"),
        # The embedded default's aux loss is dropped for expert choice; one the user asks for is refused.
        (["--moe-aux-loss-coeff", "0.01"], "--moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.01"),
        (["--moe-token-dispatcher-type", "flex"], "--moe-token-dispatcher-type flex"),
        (["--moe-aux-loss-coeff", "0", "--moe-expert-capacity-factor", "1.0"], "--moe-expert-capacity-factor 1.0"),
        (["--moe-aux-loss-coeff", "0", "--moe-router-enable-expert-bias"], "--moe-router-enable-expert-bias"),
        (["--moe-aux-loss-coeff", "0", "--moe-balance-losses", "expert"], "--moe-balance-losses"),
        (["--moe-aux-loss-coeff", "0", "--moe-permute-fusion"], "--moe-permute-fusion"),
    ],
)
def test_bad_input_fails_before_any_rank_starts(tmp_path, args, message) -> None:
    code, err = run_launcher(tmp_path, "--moe-router-type", "expert_choice", "--moe-token-dispatcher-type", "allgather",
                             *args, "--dry-run")
    assert code == 2, err[-3000:]
    assert "usage:" in err and message in err and "fix:" in err, err[-3000:]


def test_dry_run_accepts_the_documented_command(tmp_path) -> None:
    code, err = run_launcher(tmp_path, "--moe-router-type", "expert_choice", "--moe-aux-loss-coeff", "0",
                             "--moe-token-dispatcher-type", "allgather", "--dry-run")
    assert code == 0, err[-3000:]
