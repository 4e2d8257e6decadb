"""FP8 experts vs bf16 experts on the tiny CPU model: final train/validation loss and time per iteration.

Runs ``megatron-moe-ext train`` (the embedded default: 2-layer GPT, hidden 64, 4 experts of 256, top-2,
EP=2 on 2 gloo ranks, byte-level stdlib corpus) with ``--bf16`` once per variant, same seed and data:
bf16 experts (the baseline: Megatron's ``--bf16`` runs on this CPU, the e2e test
``test_bf16_distributed_optimizer_and_expert_bias_update`` trains with it), then ``--moe-fp8-format hybrid``
with each recipe (``--moe-fp8-recipe tensorwise``, ``rowwise``). Only the experts' GEMMs differ.

Reported per variant: the final train loss (mean over the last ``--last`` iterations of the exact
per-iteration loss from ``--ext-loss-log``: the sum of every rank's and micro-batch's loss sum over the
sum of their tokens), the final validation loss (Megatron's "validation loss at iteration N on
validation set" line after the last iteration), the relative difference of both to the baseline
((fp8 - bf16) / bf16; the goal of issue #20: within 2%), and the median time per iteration (Megatron's
"elapsed time per iteration", the first iteration left out) relative to the baseline. Not a test:

    python benchmarks/fp8_training.py --iters 300 --markdown /tmp/fp8.md
    python benchmarks/fp8_training.py --iters 5 --last 2      # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_description, markdown_table

BASELINE = "bf16 experts"
FP32_CONTROL = "fp32 model (control, no --bf16)"
VARIANTS: dict[str, list[str]] = {
    BASELINE: ["--bf16"],
    "fp8 hybrid tensorwise": ["--bf16", "--moe-fp8-format", "hybrid", "--moe-fp8-recipe", "tensorwise"],
    "fp8 hybrid rowwise": ["--bf16", "--moe-fp8-format", "hybrid", "--moe-fp8-recipe", "rowwise"],
}
# --fp32-control adds the whole model in fp32: how far bf16 itself moves the loss, the scale against which
# the FP8 differences read (the FP8 path computes bias, activation and probability in float32 and rounds the
# experts' output once, where the bf16 experts round at every step).
CONTROL_ARGS: list[str] = []
GOAL = 0.02  # |relative difference of the final losses| (issue #20)

_ELAPSED = re.compile(r"\] iteration +(\d+)/ *\d+ \|.*elapsed time per iteration \(ms\): ([0-9.]+)")
_VALID = re.compile(r"validation loss at iteration (\d+) on validation set \| lm loss value: ([0-9.eE+-]+|nan|inf)")


def train_losses(prefix: Path) -> dict[int, float]:
    """iteration -> loss per token over every rank and micro-batch (the --ext-loss-log files PREFIX.rankN)."""
    sums: dict[int, list[float]] = {}
    for path in sorted(prefix.parent.glob(f"{prefix.name}.rank*")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            acc = sums.setdefault(record["iteration"], [0.0, 0.0])
            acc[0] += record["loss_sum"]
            acc[1] += record["tokens"]
    return {it: s / n for it, (s, n) in sorted(sums.items())}


def run_variant(workdir: Path, name: str, extra: list[str], *, iters: int, seed: int, last: int) -> dict:
    workdir.mkdir(parents=True)
    env = dict(os.environ)
    env.setdefault("MEGATRON_MOE_EXT_CACHE", str(workdir.parent / "cache"))
    cmd = [
        sys.executable, "-m", "megatron_moe_ext", "train", "--seed", str(seed),
        "--train-iters", str(iters), "--lr-warmup-iters", str(max(1, iters // 20)),
        "--eval-interval", str(iters), "--eval-iters", "4", "--log-interval", "1",
        "--ext-loss-log", str(workdir / "loss"), *extra,
    ]
    proc = subprocess.run(cmd, check=False, cwd=workdir, env=env, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: {' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    losses = train_losses(workdir / "loss")
    if len(losses) != iters:
        raise RuntimeError(f"{name}: {len(losses)} iterations in the loss log, expected {iters}")
    valid = [float(m.group(2)) for m in _VALID.finditer(proc.stdout) if int(m.group(1)) == iters]
    elapsed = {int(m.group(1)): float(m.group(2)) for m in _ELAPSED.finditer(proc.stdout)}
    timed = [ms for it, ms in elapsed.items() if it > 1] or list(elapsed.values())
    tail = list(losses.values())[-last:]
    return {
        "train": sum(tail) / len(tail),
        "valid": valid[0] if valid else float("nan"),
        "ms": statistics.median(timed) if timed else float("nan"),
    }


def table(rows: dict[str, dict], *, iters: int, last: int) -> str:
    base = rows[BASELINE]
    body = []
    for name, r in rows.items():
        body.append([
            name, f"{r['train']:.4f}", f"{(r['train'] - base['train']) / base['train']:+.2%}",
            f"{r['valid']:.4f}", f"{(r['valid'] - base['valid']) / base['valid']:+.2%}",
            f"{r['ms']:.0f}", f"{r['ms'] / base['ms']:.2f}",
        ])
    header = ["variant", f"train loss (last {last})", "vs bf16", f"valid loss (iter {iters})", "vs bf16",
              "ms/iter", "time ratio"]
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=300, help="training iterations per variant (default 300)")
    parser.add_argument("--last", type=int, default=20, help="iterations averaged for the final train loss")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--markdown", type=Path, help="also write the section to this file (atomically)")
    parser.add_argument("--fp32-control", action="store_true",
                        help="also train the whole model in fp32 (no --bf16): the loss change bf16 itself causes")
    parser.add_argument("--only-control", action="store_true", help="train the fp32 control alone (with the bf16 "
                        "baseline it is compared with)")
    args = parser.parse_args(argv)
    if args.iters < 1 or not 1 <= args.last <= args.iters:
        parser.error(f"--iters {args.iters} --last {args.last}: need iters >= 1 and 1 <= last <= iters; "
                     f"fix: e.g. --iters 300 --last 20")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fp8_training_") as tmp:
        variants = {BASELINE: VARIANTS[BASELINE]} if args.only_control else dict(VARIANTS)
        if args.fp32_control or args.only_control:
            variants[FP32_CONTROL] = CONTROL_ARGS
        for i, (name, extra) in enumerate(variants.items()):
            rows[name] = run_variant(Path(tmp) / f"v{i}", name, extra, iters=args.iters, seed=args.seed,
                                     last=args.last)
            print(f"{name}: train {rows[name]['train']:.4f} valid {rows[name]['valid']:.4f} "
                  f"{rows[name]['ms']:.0f} ms/iter", flush=True)
    base = rows[BASELINE]
    goals = [f"- {name}: |train diff| {abs(r['train'] - base['train']) / base['train']:.2%}, |valid diff| "
             f"{abs(r['valid'] - base['valid']) / base['valid']:.2%} (goal <= {GOAL:.0%})"
             for name, r in rows.items() if name not in (BASELINE, FP32_CONTROL)]
    section = "\n".join([
        "## FP8 experts vs bf16 experts, demo model (CPU)", "",
        f"`python benchmarks/fp8_training.py --iters {args.iters} --last {args.last} --seed {args.seed}"
        + (" --fp32-control" if args.fp32_control else " --only-control" if args.only_control else "") + "`; "
        + ", ".join(f"{k}: {v}" for k, v in machine_description().items()), "",
        table(rows, iters=args.iters, last=args.last), "", "goals:", *goals, "",
    ])
    print(section)
    if args.markdown is not None:
        tmp_path = args.markdown.with_name(args.markdown.name + ".tmp")
        tmp_path.write_text(section)
        os.replace(tmp_path, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
