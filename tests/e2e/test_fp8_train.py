"""`megatron-moe-ext train --moe-fp8-format hybrid` end to end (2 gloo ranks, EP=2, the demo model): the loss is
finite, and a run saved and resumed with FP8 on continues with exactly the losses of an uninterrupted one
(current scaling keeps no state across steps, so the checkpoint needs nothing beyond the weights)."""

from __future__ import annotations

import math

import pytest
from test_train import losses, train

SHORT = ["--train-iters", "6", "--lr-warmup-iters", "1", "--eval-interval", "100", "--save-interval", "3",
         "--moe-fp8-format", "hybrid"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("fp8")
    straight = train(tmp, *SHORT, "--save", "A", "--ext-loss-log", "A/loss")
    train(tmp, *SHORT, "--save", "B", "--ext-loss-log", "B/loss", "--exit-interval", "3")
    resumed = train(tmp, *SHORT, "--save", "B", "--load", "B", "--ext-loss-log", "B/loss")
    return {"tmp": tmp, "straight": straight, "resumed": resumed}


def test_fp8_hybrid_training_loss_is_finite_and_falls(runs) -> None:
    for rank in (0, 1):
        per_token = {it: s / n for it, (s, n) in losses(runs["tmp"] / "A" / "loss", rank).items()}
        assert sorted(per_token) == [1, 2, 3, 4, 5, 6]
        assert all(math.isfinite(v) for v in per_token.values()), per_token
    assert "lm loss:" in runs["straight"].stdout and "nan iterations:   0" in runs["straight"].stdout


def test_fp8_resume_reproduces_uninterrupted_run(runs) -> None:
    tmp = runs["tmp"]
    for rank in (0, 1):
        a, b = losses(tmp / "A" / "loss", rank), losses(tmp / "B" / "loss", rank)
        assert sorted(b) == [1, 2, 3, 4, 5, 6]
        for it in (4, 5, 6):
            assert a[it] == b[it], f"rank {rank} iteration {it}: uninterrupted {a[it]} vs resumed {b[it]}"
    assert "iteration        4/       6" in runs["resumed"].stdout, "the resumed run did not start at iteration 4"
