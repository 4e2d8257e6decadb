"""`megatron-moe-ext train --moe-fp8-format hybrid --moe-fp8-recipe rowwise`: 5 iterations on 2 gloo ranks (EP=2)
with a finite loss, and the FP8 refusals of the launcher (exit 2 with the values and the fix, before any rank)."""

from __future__ import annotations

import math

import pytest
from test_train import losses, run_launcher, train


def test_fp8_rowwise_training_loss_is_finite(tmp_path) -> None:
    proc = train(tmp_path, "--train-iters", "5", "--lr-warmup-iters", "1", "--eval-interval", "100",
                 "--moe-fp8-format", "hybrid", "--moe-fp8-recipe", "rowwise", "--ext-loss-log", "r/loss")
    for rank in (0, 1):
        per_token = [s / n for s, n in losses(tmp_path / "r" / "loss", rank).values()]
        assert len(per_token) == 5 and all(math.isfinite(v) for v in per_token), per_token
    assert "nan iterations:   0" in proc.stdout


# The demo model: hidden 64, dense FFN 256, 4 experts of 256.
REFUSALS = {
    "granularity": (["--moe-granularity", "32", "--moe-expansion-rate", "1"],
                    "--moe-fp8-format hybrid with --moe-granularity 32: the expert size --ffn-hidden-size / G = "
                    "256/32 = 8 is not a multiple of 16", "fix: --moe-granularity 16"),
    "expert_size": (["--moe-ffn-hidden-size", "36"], "--moe-fp8-format hybrid with expert FFN size 36",
                    "fix: --moe-ffn-hidden-size 32"),
    "hidden": (["--hidden-size", "72"], "--moe-fp8-format hybrid with --hidden-size 72", "fix: --hidden-size 64"),
    "te": (["--moe-expert-backend", "te"], "--moe-fp8-format hybrid with --moe-expert-backend te",
           "fix: --fp8-format hybrid --fp8-recipe tensorwise instead of --moe-fp8-format"),
    "megatron": (["--moe-expert-backend", "megatron"], "--moe-fp8-format hybrid with --moe-expert-backend megatron",
                 "fix: --moe-expert-backend grouped"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_fp8_refusals_before_any_rank(tmp_path, case: str) -> None:
    args, message, fix = REFUSALS[case]
    code, err = run_launcher(tmp_path, "--moe-fp8-format", "hybrid", *args, "--dry-run")
    assert code == 2, err[-3000:]
    assert "usage:" in err and message in err and fix in err, err[-3000:]


def test_megatron_fp8_with_our_backend_names_moe_fp8_format(tmp_path) -> None:
    code, err = run_launcher(tmp_path, "--fp8-format", "e4m3", "--dry-run")
    assert code == 2, err[-3000:]
    assert "--fp8-format e4m3 with --moe-expert-backend grouped" in err, err[-3000:]
    assert "--moe-fp8-format e4m3 instead of --fp8-format" in err, err[-3000:]


def test_aligned_fp8_settings_pass_the_launcher(tmp_path) -> None:
    code, err = run_launcher(tmp_path, "--moe-fp8-format", "e4m3", "--moe-fp8-recipe", "rowwise",
                             "--moe-granularity", "16", "--moe-expansion-rate", "1", "--dry-run")
    assert code == 0, err[-3000:]
