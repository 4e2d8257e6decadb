"""A resume whose LR schedule differs from the checkpoint's is refused before any rank starts (Megatron's
OptimizerParamScheduler asserts inside the ranks otherwise), unless the run overrides or keeps the schedule."""

from __future__ import annotations

import argparse

from megatron_moe_ext.checkpoint.torch_dist import schedule_differences

SAVED = dict(lr=5e-3, min_lr=5e-4, lr_warmup_fraction=None, lr_warmup_iters=10, lr_decay_iters=None, train_iters=300,
             lr_decay_style="cosine", weight_decay=0.01, start_weight_decay=0.01, end_weight_decay=0.01,
             weight_decay_incr_style="constant", global_batch_size=16)
RUN = dict(SAVED, start_weight_decay=None, end_weight_decay=None, override_opt_param_scheduler=False,
           use_checkpoint_opt_param_scheduler=False, no_load_optim=False, finetune=False)


def _diff(**run) -> list:
    return schedule_differences(argparse.Namespace(**SAVED), argparse.Namespace(**{**RUN, **run}))


def test_the_same_schedule_passes() -> None:
    assert _diff() == []  # unset start/end weight decay default to --weight-decay, as Megatron validates them


def test_a_longer_run_is_named() -> None:
    assert _diff(train_iters=600) == [("decay iterations (--lr-decay-iters, else --train-iters)", 300, 600)]
    # ...unless the decay is pinned by --lr-decay-iters to the checkpoint's
    assert _diff(train_iters=600, lr_decay_iters=300) == []


def test_each_schedule_value_is_compared() -> None:
    assert [w for w, *_ in _diff(lr=1e-3, lr_warmup_iters=5, lr_decay_style="linear", global_batch_size=32)] == [
        "learning rate (--lr)", "warm-up (--lr-warmup-iters/--lr-warmup-fraction)", "decay style (--lr-decay-style)",
        "global batch size (--global-batch-size)"]


def test_megatrons_own_switches_turn_the_check_off() -> None:
    for switch in ("override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler", "no_load_optim", "finetune"):
        assert _diff(train_iters=600, **{switch: True}) == []
