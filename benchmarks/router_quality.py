"""Training quality of routers on the tiny CPU model: product keys (each query norm) vs Megatron's
dense TopKRouter, same experts, same data, same seed.

Runs ``megatron-moe-ext train`` (the embedded default: 2-layer GPT, byte-level stdlib corpus, EP=2 on
2 gloo ranks) once per variant and reports the mean training loss over the last iterations and
the final validation loss, with the ratio to the dense router. Not a timing benchmark.

    python benchmarks/router_quality.py --iters 150 --experts 16 --markdown benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "topk (Megatron TopKRouter)": [],
    "product_key rmsnorm": ["--moe-router-type", "product_key", "--moe-pk-query-norm", "rmsnorm"],
    "product_key layernorm": ["--moe-router-type", "product_key", "--moe-pk-query-norm", "layernorm"],
    "product_key batchnorm": ["--moe-router-type", "product_key", "--moe-pk-query-norm", "batchnorm"],
    "product_key none": ["--moe-router-type", "product_key", "--moe-pk-query-norm", "none"],
}
_VALID = re.compile(r"validation loss at iteration (\d+) on test set \| lm loss value: ([0-9.E+-]+)")


def train_losses(workdir: Path, iters: int, experts: int, key_dim: int, extra: list[str], last: int, seed: int = 1234) -> dict:
    """One training run; mean train loss over the last ``last`` iterations and the test loss."""
    env = dict(os.environ, MEGATRON_MOE_EXT_CACHE=str(workdir.parent / "cache"))
    cmd = [
        sys.executable, "-m", "megatron_moe_ext", "train",
        "--num-experts", str(experts), "--moe-pk-key-dim", str(key_dim),
        "--train-iters", str(iters), "--lr-warmup-iters", str(max(1, iters // 20)),
        "--eval-interval", str(iters), "--eval-iters", "4", "--save-interval", str(10 * iters),
        "--save", str(workdir / "ckpt"), "--ext-loss-log", str(workdir / "loss"), "--seed", str(seed), *extra,
    ]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    per_iter: dict[int, list[float]] = {}
    for rank in (0, 1):
        for line in Path(f"{workdir / 'loss'}.rank{rank}").read_text().splitlines():
            rec = json.loads(line)
            acc = per_iter.setdefault(rec["iteration"], [0.0, 0.0])
            acc[0] += rec["loss_sum"]
            acc[1] += rec["tokens"]
    its = sorted(per_iter)[-last:]
    train = sum(per_iter[i][0] / per_iter[i][1] for i in its) / len(its)
    valid = [float(m.group(2)) for m in _VALID.finditer(proc.stdout)]
    first = per_iter[min(per_iter)]
    return {"first": first[0] / first[1], "train": train, "valid": valid[-1] if valid else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--experts", type=int, default=16, help="a perfect square (product-key grid)")
    parser.add_argument("--key-dim", type=int, default=16)
    parser.add_argument("--last", type=int, default=20, help="iterations averaged for the train loss")
    parser.add_argument("--seed", type=int, default=1234, help="Megatron's --seed (initialisation and data order)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.time()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.variants):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            rows[name] = train_losses(work, args.iters, args.experts, args.key_dim, VARIANTS[name], args.last, args.seed)
            print(f"{name}: {rows[name]}", flush=True)
    base = rows.get("topk (Megatron TopKRouter)")
    lines = [
        f"Setting: `megatron-moe-ext train` embedded default (2-layer GPT, hidden 64, SwiGLU experts of 256, top-2, "
        f"aux loss 1e-2, z-loss 1e-3, EP=2 on 2 gloo ranks, byte-level stdlib corpus), {args.experts} experts, "
        f"{args.iters} iterations, seed {args.seed}, product-key d_key {args.key_dim}; train loss = mean over the last {args.last} "
        "iterations; valid = Megatron's test-set loss at the end.",
        "",
        "| router | first loss | train loss | valid loss | train / topk | valid / topk |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        rel_t = f"{r['train'] / base['train']:.4f}" if base else "-"
        rel_v = f"{r['valid'] / base['valid']:.4f}" if base else "-"
        lines.append(f"| {name} | {r['first']:.4f} | {r['train']:.4f} | {r['valid']:.4f} | {rel_t} | {rel_v} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        cmd = "python benchmarks/router_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
        section = (
            f"\n## Router training quality: product keys vs TopKRouter (CPU)\n\nMeasured "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {(time.time() - start) / 60:.1f} min.\n\n"
            f"Command:\n\n```\n{cmd}\n```\n\n{text}\n"
        )
        with open(args.markdown, "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
