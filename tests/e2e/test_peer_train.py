"""`megatron-moe-ext train` with a PEER layer (layer 2 of the tiny MoE GPT; tables sharded over EP=2,
their own learning rate through the optimizer groups): megatron.training.pretrain learns."""

from __future__ import annotations

from test_product_key_train import mean_losses
from test_train import train

ITERS = 60
PEER = [
    "--moe-peer-num-experts", "256", "--moe-peer-heads", "4", "--moe-peer-topk", "8", "--moe-peer-key-dim", "32",
    "--moe-peer-layers", "2", "--moe-peer-shared-ffn-hidden-size", "64", "--moe-peer-shard", "ep",
    "--moe-peer-table-lr-mult", "2.0",
]


def test_tiny_model_with_a_peer_layer_learns(tmp_path) -> None:
    train(
        tmp_path, *PEER, "--train-iters", str(ITERS), "--lr-warmup-iters", "5", "--eval-interval", "1000",
        "--save-interval", "1000", "--save", "peer", "--ext-loss-log", "peer/loss",
    )
    loss = mean_losses(tmp_path / "peer" / "loss")
    first = sum(loss[i] for i in range(1, 6)) / 5
    last = sum(loss[i] for i in range(ITERS - 9, ITERS + 1)) / 10
    print(f"PEER tiny model: mean loss {first:.4f} (iterations 1-5) -> {last:.4f} ({ITERS - 9}-{ITERS})")
    assert last < first - 1.0, (first, last)


def test_peer_model_trains_with_the_subkey_loss_and_logs_it(tmp_path) -> None:
    """`megatron-moe-ext train` (tiny MoE GPT, PEER layer 2, tables over EP=2) with the subkey loss and the
    metrics: it runs, and Megatron's console log shows our loss and metrics by name."""
    import os
    import subprocess
    import sys

    peer = ["--moe-peer-num-experts", "256", "--moe-peer-heads", "4", "--moe-peer-topk", "8", "--moe-peer-key-dim",
            "32", "--moe-peer-layers", "2", "--moe-peer-shared-ffn-hidden-size", "64", "--moe-peer-shard", "ep"]
    env = dict(os.environ, MEGATRON_MOE_EXT_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_moe_ext", "train", *peer, "--moe-balance-losses", "subkey",
         "--moe-balance-metrics", "--train-iters", "4", "--lr-warmup-iters", "1", "--eval-interval", "1000", "--save-interval", "1000",
         "--log-interval", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "subkey_balance_loss" in log and "pk_rows_used" in log, log[-4000:]
