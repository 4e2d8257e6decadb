"""Product-key top-k core: how its time grows with the number of experts N = n*n (CPU, fp32).

``product_key_topk`` forward + backward of (scores * w).sum() at fixed tokens, heads, k and d_key, for
N = 4K .. 1M (n = 64 .. 1024 sub-keys per side, per-head sub-keys). Its cost is O((n + k^2) d_key) per token
and head, so from N = 4K to 1M (n x16) the time should grow <= 20x, against x256 for a dense router over all N.
All sizes are timed interleaved in one process (``common.py``); the ratios of medians to the smallest N are the
result (CPU-time ratios are a cross-check), absolute times are context. Before timing, each size's ids and scores are checked against the brute-force
reference on a few tokens (sizes with N <= 16K; beyond, the reference's [H, N, D] keys get too large).

Usage: ``python benchmarks/bench_product_keys.py [--sides 64 128 ...] [--markdown PATH]``; ``--smoke`` picks
tiny sizes (the unit test runs it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from benchmarks.common import interleaved_medians, machine_description, markdown_table, paired_ratios, text_table  # noqa: E402
from megatron_moe_ext.kernels.product_keys import product_key_topk, product_key_topk_reference  # noqa: E402

FULL = dict(sides=[64, 128, 256, 512, 1024], tokens=4096, heads=8, k=16, d_key=128, repeats=5, warmup=1)
SMOKE = dict(sides=[8, 16], tokens=64, heads=2, k=4, d_key=16, repeats=1, warmup=0)
MIN_REPEATS = 5
GOAL_GROWTH = 20.0  # time(N = 1M) / time(N = 4K) must stay at or below this
SECTION_TITLE = "Product-key top-k core vs number of experts (CPU)"
CHECK_MAX_N = 16384


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", help=f"sub-keys per side n, N = n*n (default {FULL['sides']})")
    parser.add_argument("--tokens", type=int, help=f"tokens T (default {FULL['tokens']})")
    parser.add_argument("--heads", type=int, help=f"heads H (default {FULL['heads']})")
    parser.add_argument("--k", type=int, help=f"top-k per head (default {FULL['k']})")
    parser.add_argument("--d-key", type=int, help=f"query/key width (default {FULL['d_key']})")
    parser.add_argument("--repeats", type=int, help=f"timed interleaved repeats, >= {MIN_REPEATS} (default {FULL['repeats']})")
    parser.add_argument("--warmup", type=int, help=f"untimed rounds before timing (default {FULL['warmup']})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--markdown", type=Path, default=None, help="append a results section to this markdown file")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes for a quick check (defaults {SMOKE})")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < MIN_REPEATS and not args.smoke:
        parser.error(f"--repeats {args.repeats}: the protocol needs >= {MIN_REPEATS} (only --smoke may use fewer)")
    args.sides = sorted(set(args.sides))
    return args


def make_case(args: argparse.Namespace, n: int) -> dict:
    gen = torch.Generator().manual_seed(n)
    h, d = args.heads, args.d_key
    return dict(
        q_THD=torch.randn(args.tokens, h, d, generator=gen).requires_grad_(),
        keys_H2nD2=(torch.randn(h, 2, n, d // 2, generator=gen) / d**0.5).requires_grad_(),
        w_THK=torch.randn(args.tokens, h, args.k, generator=gen),
    )


def check(case: dict, k: int, n: int, tokens: int = 4) -> None:
    """ids equal, scores close to the brute-force reference on the first few tokens; SystemExit otherwise."""
    if n * n > CHECK_MAX_N:
        return
    with torch.no_grad():
        q = case["q_THD"][:tokens]
        scores, ids = product_key_topk(q, case["keys_H2nD2"], k)
        ref_scores, ref_ids = product_key_topk_reference(q, case["keys_H2nD2"], k)
    if not torch.equal(ids, ref_ids) or not torch.allclose(scores, ref_scores, rtol=1e-5, atol=1e-5):
        raise SystemExit(f"check failed: N={n * n}: product-key top-k differs from brute force; refusing to time it")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# {SECTION_TITLE}")
    for key, value in machine_description().items():
        print(f"{key}: {value}")
    print(f"T={args.tokens} tokens, H={args.heads} heads, k={args.k}, d_key={args.d_key}, fp32, per-head sub-keys, "
          f"forward + backward, median of {args.repeats} interleaved repeats (warmup {args.warmup})")

    cases = {n: make_case(args, n) for n in args.sides}
    for n, case in cases.items():
        check(case, args.k, n)

    def clear(name: str) -> None:
        for t in (cases[int(name)]["q_THD"], cases[int(name)]["keys_H2nD2"]):
            t.grad = None

    def step(n: int):
        case = cases[n]

        def run() -> None:
            scores, _ = product_key_topk(case["q_THD"], case["keys_H2nD2"], args.k)
            (scores * case["w_THK"]).sum().backward()
        return run

    samples: dict[str, list[float]] = {}
    cpu_samples: dict[str, list[float]] = {}
    medians = interleaved_medians({str(n): step(n) for n in args.sides}, args.repeats, args.warmup,
                                  setup=clear, samples=samples, cpu_samples=cpu_samples)
    first = str(args.sides[0])
    cpu_med = {name: statistics.median(values) for name, values in cpu_samples.items()}
    headers = ["N", "n", "median ms", "ratio vs first", "per-repeat ratio (min-max)", "CPU-time ratio", "N ratio"]
    rows = []
    for n in args.sides:
        per_round = sorted(paired_ratios(samples, str(n), first))
        rows.append([str(n * n), str(n), f"{1e3 * medians[str(n)]:.1f}", f"{medians[str(n)] / medians[first]:.2f}x",
                     f"{per_round[0]:.2f}-{per_round[-1]:.2f}", f"{cpu_med[str(n)] / cpu_med[first]:.2f}x",
                     f"{(n / args.sides[0]) ** 2:.0f}x"])
    print(text_table(headers, rows))
    lo, hi = args.sides[0], args.sides[-1]
    growth = medians[str(hi)] / medians[str(lo)]
    if (lo, hi) == (64, 1024):
        verdict = "met" if growth <= GOAL_GROWTH else "NOT met"
        goal = f"goal: time grows <= {GOAL_GROWTH:.0f}x from N=4K to N=1M: {growth:.2f}x -> {verdict}"
    else:
        goal = f"goal (<= {GOAL_GROWTH:.0f}x from N=4K to N=1M) not evaluated: sizes N={lo * lo}..{hi * hi}, growth {growth:.2f}x"
    print(goal)
    if args.markdown is not None:
        with open(args.markdown, "a", encoding="utf-8") as handle:
            handle.write(f"## {SECTION_TITLE}\n\n" + markdown_table(headers, rows) + f"\n\n{goal}\n\n")


if __name__ == "__main__":
    main()
