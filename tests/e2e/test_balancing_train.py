"""`megatron-moe-ext train` with every balance loss and the metrics: they reach Megatron's own
training log (which prints only a fixed list of MoE names) next to its aux loss and z-loss, and our
micro-batch expert loss logs exactly Megatron's aux_loss (same normalisation, same scores)."""

from __future__ import annotations

import re

from test_train import train

LOSSES = ["expert", "global_expert", "sequence", "device", "communication", "subkey"]
LOGGED = ["expert_balance_loss", "global_expert_balance_loss", "seq_balance_loss", "device_balance_loss", "comm_balance_loss",
          "subkey_balance_loss", "max_violation", "load_entropy", "experts_used_fraction",
          "max_violation_ep_rank_max", "device_max_violation", "pk_rows_used", "pk_cols_used"]


def test_balance_losses_and_metrics_appear_in_megatrons_log(tmp_path) -> None:
    proc = train(
        tmp_path, "--num-experts", "16", "--moe-pk-key-dim", "16", "--moe-router-type", "product_key",
        "--moe-balance-losses", *LOSSES, "--moe-balance-metrics", "--train-iters", "2", "--lr-warmup-iters", "1",
        "--eval-interval", "1000", "--save-interval", "1000", "--save", "ck",
    )
    lines = [line for line in proc.stdout.splitlines() if re.search(r"iteration +\d+/ +2 \|", line)]
    assert len(lines) == 2, proc.stdout[-3000:]
    for line in lines:
        logged = {}
        for name in ["load_balancing_loss", "z_loss", *LOGGED]:
            match = re.search(rf" {name}: ([0-9.E+-]+) \|", line)
            assert match, f"{name} missing from: {line}"
            logged[name] = match.group(1)
            assert float(logged[name]) >= 0, line
        assert logged["expert_balance_loss"] == logged["load_balancing_loss"], line
