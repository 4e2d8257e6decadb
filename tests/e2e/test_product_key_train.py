"""`megatron-moe-ext train` with the product-key router: it learns, and its loss stays within 2% of
Megatron's dense TopKRouter at the same experts, data and seed (benchmarks/router_quality.py runs
the longer comparison, per query norm, recorded in benchmarks/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

from test_train import losses, train

ITERS = 60
COMMON = [
    "--num-experts", "16", "--moe-pk-key-dim", "16", "--train-iters", str(ITERS), "--lr-warmup-iters", "5",
    "--eval-interval", "1000", "--save-interval", "1000", "--seed", "1234",
]


def mean_losses(prefix: Path) -> dict[int, float]:
    per_iter: dict[int, list[float]] = {}
    for rank in (0, 1):
        for it, (loss_sum, tokens) in losses(prefix, rank).items():
            acc = per_iter.setdefault(it, [0.0, 0.0])
            acc[0] += loss_sum
            acc[1] += tokens
    return {it: s / t for it, (s, t) in per_iter.items()}


def test_product_key_router_trains_within_2_percent_of_topk(tmp_path) -> None:
    runs = {}
    for name, extra in (("topk", []), ("product_key", ["--moe-router-type", "product_key"])):
        proc = train(tmp_path, *COMMON, *extra, "--save", name, "--ext-loss-log", f"{name}/loss")
        runs[name] = mean_losses(tmp_path / name / "loss")
        if name == "product_key":
            assert "[product-key: 1 head(s) x 4x4 grid, d_key 16, batchnorm queries]" in proc.stdout, "accounting report lacks the router"
    first = {n: sum(r[i] for i in range(1, 6)) / 5 for n, r in runs.items()}
    last = {n: sum(r[i] for i in range(ITERS - 9, ITERS + 1)) / 10 for n, r in runs.items()}
    print(f"mean loss over iterations {ITERS - 9}-{ITERS}: topk {last['topk']:.4f}, product_key "
          f"{last['product_key']:.4f} (ratio {last['product_key'] / last['topk']:.4f})")
    assert last["product_key"] < first["product_key"] - 1.0, (first, last)
    assert last["product_key"] <= 1.02 * last["topk"], last
