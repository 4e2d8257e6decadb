"""Router forward + backward: ProductKeyRouter vs Megatron's TopKRouter as the number of experts grows (CPU).

Both are the real Megatron routers (``router(hidden [S, B, h]) -> probs [T, N], routing_map [T, N]``) on
one gloo rank through this package's CPU runtime, same tokens, same top-k, softmax gates, no aux loss;
forward, then backward from a fixed random upstream gradient g [T, N] for the dense probs
(``probs.backward(g)``: what the token dispatcher hands back). ``--consumer`` instead times
``(probs * w).sum()`` and its backward too, an O(T N) consumer both sides pay (at N = 64K it takes
about 1.5 s of the product-key side's 3.6 s). TopKRouter computes a dense [T, N] logit
matrix (O(N h) per token); the product-key router scores 2 sqrt(N) sub-keys per token (O(h D + sqrt(N) D)),
but still writes Megatron's dense [T, N] outputs, which bounds its speed-up at large N.

Before timing, each N checks exactness on the first tokens: a product-key router without query norm
must route exactly like a TopKRouter whose gate weight is its full key matrix times W_q.

Usage: ``python benchmarks/bench_router.py [--experts 256 1024 ...] [--markdown PATH]``; ``--smoke``
picks tiny sizes (the unit test runs it). Protocol in ``common.py``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from benchmarks.bench_fine_grained import setup_runtime  # noqa: E402
from benchmarks.common import interleaved_medians, machine_description, markdown_table, paired_ratios, text_table  # noqa: E402

FULL = dict(experts=[256, 1024, 4096, 16384, 65536], tokens=4096, hidden=1024, topk=8, key_dim=128, repeats=5, warmup=1)
SMOKE = dict(experts=[64, 256], tokens=64, hidden=32, topk=4, key_dim=16, repeats=1, warmup=0)
MIN_REPEATS = 5
GOAL_N, GOAL_SPEEDUP = 65536, 10.0
SECTION_TITLE = "Product-key router vs Megatron's TopKRouter (CPU)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", help=f"N, perfect squares (default {FULL['experts']})")
    parser.add_argument("--tokens", type=int, help=f"tokens T (default {FULL['tokens']})")
    parser.add_argument("--hidden", type=int, help=f"hidden size (default {FULL['hidden']})")
    parser.add_argument("--topk", type=int, help=f"experts per token (default {FULL['topk']})")
    parser.add_argument("--key-dim", type=int, help=f"product-key query width d_key (default {FULL['key_dim']})")
    parser.add_argument("--query-norm", default="batchnorm", help="product-key query norm timed (default batchnorm, the router's default)")
    parser.add_argument("--repeats", type=int, help=f"timed interleaved repeats, >= {MIN_REPEATS} (default {FULL['repeats']})")
    parser.add_argument("--warmup", type=int, help=f"untimed rounds (default {FULL['warmup']})")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--consumer", action="store_true",
                        help="time (probs * w).sum() and its backward as well (an O(T N) consumer on both sides)")
    parser.add_argument("--markdown", type=Path, default=None, help="append a results section to this markdown file")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes (defaults {SMOKE})")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < MIN_REPEATS and not args.smoke:
        parser.error(f"--repeats {args.repeats}: the protocol needs >= {MIN_REPEATS} (only --smoke may use fewer)")
    for n in args.experts:
        if math.isqrt(n) ** 2 != n:
            parser.error(f"--experts {n} is not a perfect square")
    return args


def make_config(args: argparse.Namespace, n: int, router_type: str, query_norm: str):
    from megatron_moe_ext.config import MoEExtConfig

    return MoEExtConfig(
        num_layers=1, hidden_size=args.hidden, ffn_hidden_size=4 * args.hidden, num_attention_heads=8,
        num_moe_experts=n, moe_router_topk=args.topk, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        use_cpu_initialization=True, add_bias_linear=False, init_method_std=0.02,
        moe_router_type=router_type, moe_pk_key_dim=args.key_dim, moe_pk_query_norm=query_norm,
    )


def build(args: argparse.Namespace, n: int):
    """(product-key router timed, its norm-free twin, TopKRouter equal to the twin)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_ext.layers.product_key_router import ProductKeyRouter

    pg = get_default_pg_collection()
    torch.manual_seed(n)
    pk = ProductKeyRouter(make_config(args, n, "product_key", args.query_norm), pg_collection=pg)
    twin = ProductKeyRouter(make_config(args, n, "product_key", "none"), pg_collection=pg)
    twin.load_state_dict({k: v for k, v in pk.state_dict().items() if not k.startswith("query_norm.")})
    dense = TopKRouter(make_config(args, n, "topk", "none"), pg_collection=pg)
    rows, cols = twin.row_keys.detach()[0], twin.col_keys.detach()[0]
    n1, n2 = rows.shape[0], cols.shape[0]
    keys_ND = torch.cat([rows.unsqueeze(1).expand(n1, n2, -1), cols.unsqueeze(0).expand(n1, n2, -1)], -1).reshape(n1 * n2, -1)
    with torch.no_grad():
        dense.weight.copy_(keys_ND @ twin.query_weight)
    for r in (pk, twin, dense):
        r.set_layer_number(1)
    return pk, twin, dense


def check(twin, dense, x: torch.Tensor, n: int) -> None:
    with torch.no_grad():
        p_twin, m_twin = twin(x[:8])
        p_dense, m_dense = dense(x[:8])
    if not torch.equal(m_twin, m_dense) or not torch.allclose(p_twin, p_dense, rtol=1e-4, atol=1e-6):
        raise SystemExit(f"check failed at N={n}: product-key routing differs from the equivalent TopKRouter")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_runtime(args.threads)
    print(f"# {SECTION_TITLE}")
    machine = machine_description()
    for key, value in machine.items():
        print(f"{key}: {value}")
    setting = (f"T={args.tokens} tokens, hidden {args.hidden}, top-{args.topk}, softmax gates, fp32, no aux loss; "
               f"product keys: 1 head, d_key {args.key_dim}, {args.query_norm} queries, square grid; forward + backward "
               + ("of (probs * w).sum() (consumer included)" if args.consumer else "from a fixed upstream gradient for the dense probs")
               + f"; median of {args.repeats} interleaved repeats (warmup {args.warmup})")
    print(setting)
    headers = ["N", "n", "topk ms", "product-key ms", "speed-up", "per-repeat speed-up (min-max)", "CPU-time speed-up"]
    rows, speedups = [], {}
    for n in args.experts:
        pk, twin, dense = build(args, n)
        x = torch.randn(args.tokens, 1, args.hidden)
        check(twin, dense, x, n)
        w = torch.randn(args.tokens, n)
        routers = {"topk": dense, "product_key": pk}
        inputs = {}

        def setup(name: str) -> None:
            routers[name].zero_grad(set_to_none=True)
            inputs[name] = x.clone().requires_grad_(True)

        def step(name: str):
            def run() -> None:
                probs, _ = routers[name](inputs[name])
                if args.consumer:
                    (probs * w).sum().backward()
                else:
                    probs.backward(w)
            return run

        samples: dict[str, list[float]] = {}
        cpu: dict[str, list[float]] = {}
        med = interleaved_medians({name: step(name) for name in routers}, args.repeats, args.warmup, setup=setup,
                                  samples=samples, cpu_samples=cpu)
        per = sorted(paired_ratios(samples, "topk", "product_key"))
        cpu_speedup = statistics.median(cpu["topk"]) / statistics.median(cpu["product_key"])
        speedups[n] = med["topk"] / med["product_key"]
        rows.append([str(n), str(math.isqrt(n)), f"{1e3 * med['topk']:.1f}", f"{1e3 * med['product_key']:.1f}",
                     f"{speedups[n]:.2f}x", f"{per[0]:.2f}-{per[-1]:.2f}x", f"{cpu_speedup:.2f}x"])
        print(text_table(headers, rows[-1:]) if len(rows) == 1 else " | ".join(rows[-1]), flush=True)
        del pk, twin, dense, w, routers, inputs
    print(text_table(headers, rows))
    if GOAL_N in speedups:
        verdict = "met" if speedups[GOAL_N] >= GOAL_SPEEDUP else "NOT met"
        goal = f"goal: >= {GOAL_SPEEDUP:.0f}x faster than TopKRouter at N={GOAL_N}: {speedups[GOAL_N]:.2f}x -> {verdict}"
    else:
        goal = f"goal (>= {GOAL_SPEEDUP:.0f}x at N={GOAL_N}) not evaluated at these sizes"
    print(goal)
    if args.markdown is not None:
        machine_lines = "\n".join(f"- {k}: {v}" for k, v in machine.items())
        cmd = "python benchmarks/bench_router.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.markdown, "a", encoding="utf-8") as handle:
            handle.write(f"\n## {SECTION_TITLE}\n\nMachine:\n\n{machine_lines}\n\nCommand:\n\n```\n{cmd}\n```\n\n"
                         f"Setting: {setting}.\n\n{markdown_table(headers, rows)}\n\n{goal}\n")


if __name__ == "__main__":
    main()
