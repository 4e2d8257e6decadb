"""`megatron-moe-ext train` with a PEER layer (layer 2 of the tiny MoE GPT; tables sharded over EP=2,
their own learning rate through the optimizer groups, the sub-key balance loss and the balance
metrics on): megatron.training.pretrain learns, and Megatron's console log shows our loss and
metrics by name."""

from __future__ import annotations

from test_product_key_train import mean_losses
from test_train import train

ITERS = 60
PEER = [
    "--moe-peer-num-experts", "256", "--moe-peer-heads", "4", "--moe-peer-topk", "8", "--moe-peer-key-dim", "32",
    "--moe-peer-layers", "2", "--moe-peer-shared-ffn-hidden-size", "64", "--moe-peer-shard", "ep",
    "--moe-peer-table-lr-mult", "2.0", "--moe-balance-losses", "subkey", "--moe-balance-metrics",
]


def test_tiny_model_with_a_peer_layer_learns_and_logs_its_balance(tmp_path) -> None:
    proc = train(
        tmp_path, *PEER, "--train-iters", str(ITERS), "--lr-warmup-iters", "5", "--eval-interval", "1000",
        "--save-interval", "1000", "--save", "peer", "--ext-loss-log", "peer/loss", "--log-interval", "1",
    )
    loss = mean_losses(tmp_path / "peer" / "loss")
    first = sum(loss[i] for i in range(1, 6)) / 5
    last = sum(loss[i] for i in range(ITERS - 9, ITERS + 1)) / 10
    print(f"PEER tiny model: mean loss {first:.4f} (iterations 1-5) -> {last:.4f} ({ITERS - 9}-{ITERS})")
    assert last < first - 1.0, (first, last)
    log = proc.stdout + proc.stderr
    assert "subkey_balance_loss" in log and "pk_rows_used" in log, log[-4000:]
