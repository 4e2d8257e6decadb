"""Balancing behaviour on the tiny CPU model: MaxVio and train loss per balancing method.

Runs ``megatron-moe-ext train`` (the embedded default: 2-layer GPT, hidden 64, top-2, EP=2 on 2 gloo
ranks, byte-level stdlib corpus) with 16 experts and ``--moe-balance-metrics`` once per variant:
the dense router with no balancing, with each of our losses (default coefficient), with Megatron's
aux_loss 1e-2 for reference; the product-key router with no balancing, with the subkey loss, with
separable row/column bias balancing (Megatron's sign rule, and the relative rule), with the
per-expert bias on the candidate pairs alone, and with both (``--moe-pk-expert-bias-balancing``).
Megatron's own balancing is off (``--moe-router-load-balancing-type
none --moe-aux-loss-coeff 0``) except in the aux_loss reference, so only the method under test
balances; the z-loss stays at the default 1e-3.

MaxVio is our ``max_violation`` metric (MaxVio of the global batch, mean over the MoE layers) as
printed in Megatron's iteration lines, averaged over the last ``--last`` logged iterations; the
train loss is Megatron's ``lm loss`` averaged over the same iterations. Each balanced variant is
compared with the unbalanced run of the same router. Not a timing benchmark.

    python benchmarks/balancing_behaviour.py --iters 100 --markdown /tmp/balancing.md
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_description, markdown_table

OFF = ["--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "0"]
PK = ["--moe-router-type", "product_key"]
# Separable row/column biases plus the per-expert bias on the candidate pairs.
PK_BOTH = ["--moe-pk-bias-balancing", "--moe-pk-expert-bias-balancing"]

# name -> (extra flags, the unbalanced baseline of the same router, or None for a baseline)
VARIANTS: dict[str, tuple[list[str], str | None]] = {
    "dense none": ([*OFF], None),
    "dense expert": ([*OFF, "--moe-balance-losses", "expert"], "dense none"),
    "dense global_expert": ([*OFF, "--moe-balance-losses", "global_expert"], "dense none"),
    "dense sequence": ([*OFF, "--moe-balance-losses", "sequence"], "dense none"),
    "dense device": ([*OFF, "--moe-balance-losses", "device"], "dense none"),
    "dense communication": ([*OFF, "--moe-balance-losses", "communication"], "dense none"),
    "dense Megatron aux_loss 1e-2": (
        ["--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2"], "dense none"),
    "pk none": ([*OFF, *PK], None),
    "pk subkey": ([*OFF, *PK, "--moe-balance-losses", "subkey"], "pk none"),
    "pk bias (rate 1e-3, default)": ([*OFF, *PK, "--moe-pk-bias-balancing"], "pk none"),
    "pk bias (rate 1e-2)": (
        [*OFF, *PK, "--moe-pk-bias-balancing", "--moe-router-bias-update-rate", "1e-2"], "pk none"),
    "pk bias (rate 5e-2)": (
        [*OFF, *PK, "--moe-pk-bias-balancing", "--moe-router-bias-update-rate", "5e-2"], "pk none"),
    "pk bias (relative, rate 3e-2)": (
        [*OFF, *PK, "--moe-pk-bias-balancing", "--moe-pk-bias-update-rule", "relative",
         "--moe-router-bias-update-rate", "3e-2"], "pk none"),
    "pk expert bias (rate 1e-2)": (
        [*OFF, *PK, "--moe-pk-expert-bias-balancing", "--moe-router-bias-update-rate", "1e-2"], "pk none"),
    "pk bias+expert (rate 1e-3, default)": ([*OFF, *PK, *PK_BOTH], "pk none"),
    "pk bias+expert (rate 1e-2)": ([*OFF, *PK, *PK_BOTH, "--moe-router-bias-update-rate", "1e-2"], "pk none"),
    "pk bias+expert (rate 2e-2)": ([*OFF, *PK, *PK_BOTH, "--moe-router-bias-update-rate", "2e-2"], "pk none"),
    "pk bias+expert (relative, rate 3e-2)": (
        [*OFF, *PK, *PK_BOTH, "--moe-pk-bias-update-rule", "relative", "--moe-router-bias-update-rate", "3e-2"],
        "pk none"),
}
# Every selection-bias row of the product-key router (the goal: MaxVio <= 0.5 x pk none).
PK_BIAS = tuple(name for name in VARIANTS if name.startswith(("pk bias", "pk expert bias")))

_ITER = re.compile(r"\] iteration +(\d+)/ *\d+ \|(.*)")
_MAXVIO = re.compile(r"\| max_violation: ([0-9.eE+-]+|nan|inf)")
_LOSS = re.compile(r"\| lm loss: ([0-9.eE+-]+|nan|inf)")
_DEVICE = re.compile(r"\| device_max_violation: ([0-9.eE+-]+|nan|inf)")


def parse_log(stdout: str) -> list[tuple[int, float, float, float]]:
    """(iteration, max_violation, lm loss, device_max_violation or nan) of every iteration line with
    max_violation and lm loss."""
    rows = []
    for line in stdout.splitlines():
        m = _ITER.search(line)
        if not m:
            continue
        body = "|" + m.group(2)
        mv, loss, dev = _MAXVIO.search(body), _LOSS.search(body), _DEVICE.search(body)
        if mv and loss:
            rows.append((int(m.group(1)), float(mv.group(1)), float(loss.group(1)),
                         float(dev.group(1)) if dev else float("nan")))
    return rows


def train_command(iters: int, experts: int, key_dim: int, extra: list[str], workdir: Path, seed: int) -> list[str]:
    return [
        sys.executable, "-m", "megatron_moe_ext", "train",
        "--num-experts", str(experts), "--moe-pk-key-dim", str(key_dim),
        "--train-iters", str(iters), "--lr-warmup-iters", str(max(1, iters // 20)),
        "--eval-interval", str(iters), "--eval-iters", "1", "--save-interval", str(10 * iters),
        "--save", str(workdir / "ckpt"), "--seed", str(seed), "--moe-balance-metrics", *extra,
    ]


def run_variant(workdir: Path, iters: int, experts: int, key_dim: int, extra: list[str], last: int, seed: int) -> dict:
    env = dict(os.environ)
    env.setdefault("MEGATRON_MOE_EXT_CACHE", str(workdir.parent / "cache"))
    cmd = train_command(iters, experts, key_dim, extra, workdir, seed)
    start = time.time()
    proc = subprocess.run(cmd, check=False, cwd=workdir, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = parse_log(proc.stdout)
    if not rows:
        raise RuntimeError(f"no iteration line with max_violation and lm loss in the output of {' '.join(cmd)}")
    tail = rows[-last:]
    return {
        "maxvio": sum(r[1] for r in tail) / len(tail),
        "maxvio_first": rows[0][1],
        "loss": sum(r[2] for r in tail) / len(tail),
        "device_maxvio": sum(r[3] for r in tail) / len(tail),
        "loss_final": rows[-1][2],
        "iters_logged": len(rows),
        "seconds": time.time() - start,
    }


def goal_lines(rows: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in rows.items():
        base = VARIANTS[name][1]
        if base is None or base not in rows:
            continue
        ratio = r["maxvio"] / rows[base]["maxvio"]
        verdict = "NOT met" if ratio >= 1.0 else ("met (but within 5%: noise level)" if ratio > 0.95 else "met")
        lines.append(f"- {name} lowers MaxVio vs {base}: ratio {ratio:.3f} -> {verdict}")
    for name in ("dense device", "dense communication"):
        if name in rows and "dense none" in rows:
            ratio = rows[name]["device_maxvio"] / rows["dense none"]["device_maxvio"]
            lines.append(f"- (context) {name} device MaxVio vs dense none: ratio {ratio:.3f} "
                         f"({'lower' if ratio < 1 else 'not lower'})")
    for name in PK_BIAS:
        if name in rows and "pk none" in rows:
            ratio = rows[name]["maxvio"] / rows["pk none"]["maxvio"]
            lines.append(
                f"- {name} MaxVio <= 0.5 x pk none: ratio {ratio:.3f} -> {'met' if ratio <= 0.5 else 'NOT met'}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--experts", type=int, default=16, help="a perfect square (product-key grid)")
    parser.add_argument("--key-dim", type=int, default=16)
    parser.add_argument("--last", type=int, default=10, help="logged iterations averaged for MaxVio and loss")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--variants", "--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        metavar="NAME", help=f"run only these variants (default all): {', '.join(VARIANTS)}")
    parser.add_argument("--markdown", type=Path, default=None, help="append a markdown section to this file")
    args = parser.parse_args(argv)
    if args.iters < 2:
        parser.error("--iters must be >= 2 (the LR warmup must be shorter than the run)")
    machine = machine_description()
    start = time.time()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.variants):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            rows[name] = run_variant(work, args.iters, args.experts, args.key_dim, VARIANTS[name][0], args.last, args.seed)
            print(f"{name}: {rows[name]}", flush=True)
    table_rows = []
    for name, r in rows.items():
        base = VARIANTS[name][1] or name
        ratio = f"{r['maxvio'] / rows[base]['maxvio']:.3f}" if base in rows else "-"
        flags = " ".join(VARIANTS[name][0])
        table_rows.append([
            name, f"`{flags}`", f"{r['maxvio_first']:.2f}", f"{r['maxvio']:.3f}", ratio,
            f"{r['device_maxvio']:.3f}", f"{r['loss']:.4f}", f"{r['loss_final']:.4f}",
        ])
    table = markdown_table(
        ["variant", "flags", "MaxVio it 1", f"MaxVio (last {args.last})", "MaxVio / unbalanced",
         f"device MaxVio (last {args.last})", f"lm loss (last {args.last})", "final lm loss"],
        table_rows,
    )
    goals = goal_lines(rows)
    print(table)
    print("\n".join(goals))
    if args.markdown:
        cmd = "python benchmarks/balancing_behaviour.py " + " ".join(argv if argv is not None else sys.argv[1:])
        machine_text = "\n".join(f"- {k}: {v}" for k, v in machine.items())
        section = (
            f"\n## Balancing behaviour: MaxVio per method (CPU, tiny model)\n\nMeasured "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in {(time.time() - start) / 60:.1f} min.\n\n"
            f"Machine:\n\n{machine_text}\n\nCommand:\n\n```\n{cmd}\n```\n\n"
            f"Setting: `megatron-moe-ext train` embedded default (2-layer GPT, hidden 64, SwiGLU experts of 256, "
            f"top-2, EP=2 on 2 gloo ranks, z-loss 1e-3), {args.experts} experts, {args.iters} iterations, "
            f"seed {args.seed}, product-key d_key {args.key_dim} (batchnorm queries), `--moe-balance-metrics`; "
            "Megatron's aux loss off except in its reference row; our losses at their default coefficient. "
            f"MaxVio = `max_violation` of Megatron's iteration line (global batch, layer mean), mean over the "
            f"last {args.last} iterations; ratio to the unbalanced run of the same router; device MaxVio = "
            "`device_max_violation` (MaxVio over the 2 EP ranks' loads, what the device and communication "
            "losses balance), same average.\n\n"
            f"{table}\n\nGoals:\n\n" + "\n".join(goals) + "\n"
        )
        with open(args.markdown, "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
