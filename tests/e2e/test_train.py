"""`megatron-moe-ext train` end to end: megatron.training.pretrain on 2 gloo ranks (EP=2, alltoall,
DistributedOptimizer), torch_dist save, and a resume that reproduces an uninterrupted run exactly."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shared_cache

SHORT = ["--train-iters", "6", "--lr-warmup-iters", "1", "--eval-interval", "100", "--save-interval", "3"]


def train(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEGATRON_MOE_EXT_CACHE=shared_cache())
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_moe_ext", "train", *args],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def losses(prefix: Path, rank: int) -> dict[int, tuple[float, int]]:
    records = [json.loads(line) for line in Path(f"{prefix}.rank{rank}").read_text().splitlines()]
    return {r["iteration"]: (r["loss_sum"], r["tokens"]) for r in records}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("train")
    straight = train(tmp, *SHORT, "--save", "A", "--ext-loss-log", "A/loss")
    train(tmp, *SHORT, "--save", "B", "--ext-loss-log", "B/loss", "--exit-interval", "3")
    resumed = train(tmp, *SHORT, "--save", "B", "--load", "B", "--ext-loss-log", "B/loss")
    return {"tmp": tmp, "straight": straight, "resumed": resumed}


def test_resume_reproduces_uninterrupted_run(runs) -> None:
    tmp = runs["tmp"]
    for rank in (0, 1):
        a, b = losses(tmp / "A" / "loss", rank), losses(tmp / "B" / "loss", rank)
        assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [1, 2, 3, 4, 5, 6]
        for it in (4, 5, 6):
            assert a[it] == b[it], f"rank {rank} iteration {it}: uninterrupted {a[it]} vs resumed {b[it]}"
    assert "iteration        4/       6" in runs["resumed"].stdout, "the resumed run did not start at iteration 4"


def test_log_has_loss_aux_losses_throughput_and_checkpoint(runs) -> None:
    out = runs["straight"].stdout
    for needle in ("lm loss:", "load_balancing_loss:", "z_loss:", "throughput per GPU", "elapsed time per iteration"):
        assert needle in out, f"{needle!r} missing from the training log"
    ckpt = runs["tmp"] / "A"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (ckpt / "iter_0000006" / ".metadata").exists(), "not a torch_dist checkpoint"


def run_launcher(tmp: Path, *args: str) -> tuple[int, str]:
    """The launcher half only: errors must come before any rank starts. Runs ``megatron-moe-ext train`` in this
    process (the launcher starts no rank on these paths), which saves an interpreter start per case."""
    from megatron_moe_ext.cli import main

    err, cwd, cache = io.StringIO(), os.getcwd(), os.environ.get("MEGATRON_MOE_EXT_CACHE")
    os.environ["MEGATRON_MOE_EXT_CACHE"] = shared_cache()
    try:
        os.chdir(tmp)
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(["train", *args])
            except SystemExit as exit_:  # argparse errors
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(cwd)
        if cache is None:
            os.environ.pop("MEGATRON_MOE_EXT_CACHE", None)
        else:
            os.environ["MEGATRON_MOE_EXT_CACHE"] = cache
    return code, err.getvalue()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tensor-model-parallel-size", "4"], "world size 2 is not divisible by TP*PP*CP = 4*1*1"),
        (["--expert-model-parallel-size", "4"], "world size 2 is not divisible by ETP*EP*PP = 1*4*1"),
        (["--num-experts", "6", "--expert-model-parallel-size", "4", "--nproc", "4"], "--num-experts 6 is not divisible"),
        (["--data-path", "missing/prefix"], "data path missing/prefix"),
        (["--save", "blocker/sub"], "checkpoint directory --save 'blocker/sub' is not writable"),
        (["--moe-granularity", "3", "--moe-expansion-rate", "4"], "does not divide ffn_hidden_size=256"),
        (
            ["--moe-granularity", "8", "--moe-expansion-rate", "4", "--num-experts", "8"],
            "contradict --num-experts 8 (G implies 32)",
        ),
        (["--moe-granularity", "4", "--moe-expansion-rate", "1", "--moe-base-topk", "2"], "exceeds the number of experts"),
        (["--moe-expert-backend", "fast"], "--moe-expert-backend"),
    ],
)
def test_bad_input_fails_before_any_rank_starts(tmp_path, args, message) -> None:
    (tmp_path / "blocker").write_text("a file where a directory is expected")
    code, err = run_launcher(tmp_path, *args, "--dry-run")
    assert code == 2, err
    assert message in err, err
    assert not (tmp_path / "blocker" / "sub").exists()


def test_corrupt_dataset_is_refused(tmp_path) -> None:
    (tmp_path / "bad.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "bad.idx").write_bytes(b"not an index")
    code, err = run_launcher(tmp_path, "--data-path", "bad", "--dry-run")
    assert code == 2 and "bad" in err and "index" in err.lower(), err


def test_dry_run_prints_rank_command(tmp_path) -> None:
    code, _ = run_launcher(tmp_path, "--dry-run")
    assert code == 0


def test_fine_grained_g8_learns(tmp_path) -> None:
    """The embedded default at G=8 (32 experts of 32, top-8, our grouped experts, EP=2) learns."""
    proc = train(
        tmp_path, "--moe-granularity", "8", "--moe-expansion-rate", "4", "--moe-base-topk", "1",
        "--train-iters", "40", "--lr-warmup-iters", "5", "--eval-interval", "100", "--save-interval", "40",
        "--save", "g8", "--ext-loss-log", "g8/loss",
    )
    assert "32 experts x 32, top-8" in proc.stdout, "accounting report missing or wrong"
    per_iter: dict[int, float] = {}
    for rank in (0, 1):
        for it, (loss_sum, tokens) in losses(tmp_path / "g8" / "loss", rank).items():
            per_iter[it] = per_iter.get(it, 0.0) + loss_sum / tokens / 2
    first = sum(per_iter[i] for i in range(1, 6)) / 5
    last = sum(per_iter[i] for i in range(36, 41)) / 5
    print(f"G=8 mean loss: iterations 1-5 {first:.3f}, 36-40 {last:.3f}")
    assert last < first - 1.0, (first, last)


def test_upcycling_from_a_dense_checkpoint(tmp_path) -> None:
    """Dense run -> `--moe-use-upcycling` into fine-grained experts (EP=2): starts from the dense
    model's quality, not from scratch (exactness itself: tests/distributed/test_upcycling.py)."""
    from megatron_moe_ext.training.data import build_default_dataset

    prefix = build_default_dataset(tmp_path / "cache" / "data")
    model = [
        "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
        "--seq-length", "128", "--max-position-embeddings", "128", "--position-embedding-type", "rope",
        "--normalization", "RMSNorm", "--disable-bias-linear", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--micro-batch-size", "8", "--global-batch-size", "16", "--lr", "5e-3", "--lr-decay-style", "constant",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "257", "--data-path", prefix, "--split", "98,1,1",
        "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "1", "--ckpt-format", "torch_dist", "--seed", "1",
    ]
    train(tmp_path, *model, "--train-iters", "20", "--save", "dense", "--save-interval", "20", "--ext-loss-log", "dense/loss")
    up = train(
        tmp_path, *model, "--train-iters", "22", "--moe-granularity", "1", "--moe-expansion-rate", "4",
        "--moe-base-topk", "2", "--expert-model-parallel-size", "2", "--moe-use-upcycling", "--load", "dense",
        "--save", "up", "--save-interval", "100", "--ext-loss-log", "up/loss",
    )
    assert "Upcycled checkpoint saved to up" in up.stdout
    dense_first = losses(tmp_path / "dense" / "loss", 0)[1]
    dense_last = losses(tmp_path / "dense" / "loss", 0)[20]
    up_first = min(losses(tmp_path / "up" / "loss", 0).items())[1]
    per_token = [s / n for s, n in (dense_first, dense_last, up_first)]
    print("per-token loss: dense first %.3f, dense last %.3f, upcycled first %.3f" % tuple(per_token))
    assert per_token[2] < per_token[1] + 0.3 < per_token[0], per_token


def test_bf16_distributed_optimizer_and_expert_bias_update(tmp_path) -> None:
    """bf16 params with the DistributedOptimizer, sigmoid routing with the aux-loss-free expert
    bias (updated in finalize_model_grads), saved and resumed."""
    flags = [
        "--bf16", "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
        "--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0", "--moe-z-loss-coeff", "0",
        "--lr-warmup-iters", "1", "--eval-interval", "100", "--save-interval", "3", "--save", "bf",
    ]
    train(tmp_path, *flags, "--train-iters", "5", "--exit-interval", "3", "--ext-loss-log", "bf/loss")
    resumed = train(tmp_path, *flags, "--train-iters", "5", "--load", "bf", "--ext-loss-log", "bf/loss")
    assert "iteration        4/       5" in resumed.stdout
    first, last = losses(tmp_path / "bf" / "loss", 0)[1], losses(tmp_path / "bf" / "loss", 0)[5]
    assert last[0] / last[1] < first[0] / first[1], (first, last)
    # The expert bias moved away from zero: finalize_model_grads applied its sign updates.
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(tmp_path / "bf" / "iter_0000003"), str(tmp_path / "full.pt"))
    state = torch.load(tmp_path / "full.pt", weights_only=False)
    biases = [v for k, v in state.items() if k.endswith("router.expert_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases), sorted(state)[:20]
