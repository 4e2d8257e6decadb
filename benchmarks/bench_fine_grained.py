"""Fine-grained experts (ours) vs Megatron's SequentialMLP on CPU, swept over granularity G.

At every G the active and total parameters stay constant (Krajewski et al. 2024): E*G experts of
hidden size ffn/G, top-(k0*G) routing. Two measurements per G, forward + backward, fp32:

* experts only: ``FineGrainedExperts`` (backend 'grouped', see ``kernels/expert_mlp.py`` for what it
  runs on CPU) vs ``SequentialMLP`` (one MLP module per expert, as
  ``LocalSpecProvider.grouped_mlp_modules`` builds it) on the same dispatched input: tokens*topk
  rows grouped by expert with exactly equal counts per expert (forced balance), the same weights,
  the same routing probabilities. Timed with them, interleaved: the *dense bound*, one dense MLP
  (hidden k0*ffn, same activation) over all tokens, which does the experts' GEMM FLOPs
  (2*tokens*k0*ffn*hidden per projection) as two big GEMMs. megatron/dense-bound time is the
  largest speed-up any implementation of the same FLOPs could reach if it ran them as fast as one
  dense GEMM: an upper bound, not a target, since it leaves out what the dense MLP does not do,
  e.g. moving the k0*G copies of every token's row (the input, output and their gradients);
* the whole ``MoELayer`` (router + token dispatcher at EP=1 + experts + combine), built from
  ``moe_ext_gpt_block_spec`` with ``moe_expert_backend`` 'grouped' vs 'megatron', the same
  weights, and Megatron's ``moe_router_force_load_balancing`` (random router logits: near-balanced,
  not exactly; the RNG state is restored before every call so both layers route identically).

Before timing, each pair's outputs and gradients are checked to agree (outputs to 1e-4): a
benchmark comparing different math is worthless. Timing is interleaved (``common.py``); the
ratios of medians are the result, absolute times are context. Megatron runs through this
package's CPU runtime (a torch-function mode that rewrites CUDA device arguments), exactly as
training does; both sides pay for it.

Usage: ``python benchmarks/bench_fine_grained.py [--what experts|layer|both] [--markdown PATH]``;
``--smoke`` picks tiny sizes (the unit test runs it).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

# Megatron warns at import about missing TE/apex (expected on CPU): keep the report readable.
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")

from benchmarks.common import (  # noqa: E402
    interleaved_medians,
    machine_description,
    markdown_table,
    paired_ratios,
    text_table,
)

FULL = dict(granularities=[1, 2, 4, 8, 16, 32, 64], tokens=4096, hidden=512, ffn=2048, expansion=8,
            base_topk=1, repeats=5, warmup=1)
SMOKE = dict(granularities=[1, 4], tokens=64, hidden=32, ffn=64, expansion=4, base_topk=1, repeats=1, warmup=0)
MIN_REPEATS = 5
SECTION_TITLE = "Fine-grained experts vs SequentialMLP (CPU)"
OUT_ATOL = 1e-4  # outputs must agree to this before anything is timed
GRAD_RTOL = 1e-4  # gradients: relative to the largest magnitude of the reference gradient


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--granularities", type=int, nargs="+", help=f"G values (default {FULL['granularities']})")
    parser.add_argument("--tokens", type=int, help=f"tokens per batch (default {FULL['tokens']})")
    parser.add_argument("--hidden", type=int, help=f"hidden size (default {FULL['hidden']})")
    parser.add_argument("--ffn", type=int, help=f"dense FFN hidden size; experts get ffn/G (default {FULL['ffn']})")
    parser.add_argument("--expansion", type=int, help=f"expansion rate E; E*G experts (default {FULL['expansion']})")
    parser.add_argument("--base-topk", type=int, help=f"base top-k k0; top-(k0*G) (default {FULL['base_topk']})")
    parser.add_argument("--repeats", type=int, help=f"timed interleaved repeats, >= {MIN_REPEATS} (default {FULL['repeats']})")
    parser.add_argument("--warmup", type=int, help=f"untimed rounds before timing, the correctness-check pass "
                        f"counting as the first (default {FULL['warmup']})")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--what", choices=("experts", "layer", "both"), default="both")
    parser.add_argument("--dispatcher", choices=("alltoall", "allgather"), default="alltoall",
                        help="MoELayer token dispatcher (EP=1) for the layer benchmark (default alltoall)")
    parser.add_argument("--layer-routing", choices=("megatron", "exact"), default="megatron",
                        help="MoELayer routing: 'megatron' = moe_router_force_load_balancing (random logits, "
                        "near-balanced), 'exact' = token t goes to experts (t*k + j) mod N, j < k, so every expert "
                        "gets exactly tokens*k/N rows (router gating and softmax still computed) (default megatron)")
    parser.add_argument("--markdown", type=Path, default=None, help="append a results section to this markdown file")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes for a quick check (defaults {SMOKE})")
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < MIN_REPEATS and not args.smoke:
        parser.error(f"--repeats {args.repeats}: the protocol needs >= {MIN_REPEATS} (only --smoke may use fewer)")
    for g in args.granularities:
        if g < 1 or args.ffn % g:
            parser.error(f"G={g} must divide --ffn {args.ffn}")
    if (args.tokens * args.base_topk) % args.expansion:
        parser.error(f"tokens*k0 = {args.tokens * args.base_topk} must be divisible by E={args.expansion} "
                     "for exactly balanced experts")
    return args


# ---------------------------------------------------------------------------------------------
# Setup


def setup_runtime(threads: int | None) -> None:
    """Megatron's model-parallel state on one gloo rank with this package's CPU runtime."""
    from megatron_moe_ext.runtime import enable_cpu_runtime, init_gloo_from_env
    from megatron_moe_ext.testing.distributed import free_port
    from megatron_moe_ext.testing.tiny import initialize_parallel

    if threads:
        torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    enable_cpu_runtime(allow_with_cuda=True)  # a CPU benchmark by definition
    init_gloo_from_env()
    initialize_parallel()


def teardown_runtime() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def make_config(args: argparse.Namespace, granularity: int, backend: str, dispatcher: str = "alltoall",
                force_balance: bool = True):
    """One MoE layer, gelu non-gated experts without biases, fp32, forced-balanced router."""
    from megatron_moe_ext.testing.tiny import tiny_config

    return tiny_config(
        num_layers=1,
        hidden_size=args.hidden,
        ffn_hidden_size=args.ffn,
        moe_granularity=granularity,
        moe_expansion_rate=args.expansion,
        moe_base_topk=args.base_topk,
        moe_expert_backend=backend,
        moe_token_dispatcher_type=dispatcher,
        moe_router_force_load_balancing=force_balance,
        moe_router_pre_softmax=True,  # softmax over all experts, then top-k (Megatron requires it for k=1)
        init_method_std=0.02,
    )


def _pg_collection():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def copy_sequential_into_stacked(sequential, stacked) -> None:
    """SequentialMLP's per-expert weights -> FineGrainedExperts' stacked tensors."""
    with torch.no_grad():
        for e, expert in enumerate(sequential.local_experts):
            stacked.linear_fc1.weight[e].copy_(expert.linear_fc1.weight)
            stacked.linear_fc2.weight[e].copy_(expert.linear_fc2.weight)


def _grad_of(param: torch.Tensor) -> torch.Tensor:
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


def check_close(what: str, ours: torch.Tensor, ref: torch.Tensor, *, atol: float | None = None) -> float:
    """Max abs difference; SystemExit if above ``atol`` (or GRAD_RTOL x the reference's max)."""
    ours, ref = ours.detach().float(), ref.detach().float()
    if ours.shape != ref.shape:
        raise SystemExit(f"check failed: {what}: shapes differ, ours {tuple(ours.shape)} vs megatron {tuple(ref.shape)}")
    diff = (ours - ref).abs().max().item() if ref.numel() else 0.0
    tol = atol if atol is not None else GRAD_RTOL * max(1.0, ref.abs().max().item())
    if not diff <= tol:  # also catches NaN
        raise SystemExit(f"check failed: {what}: max |ours - megatron| = {diff:.3g} > {tol:.3g}; "
                         "the two implementations do not compute the same thing, refusing to time them")
    return diff


def exact_balanced_routing_map(tokens: int, num_experts: int, topk: int) -> torch.Tensor:
    """[tokens, num_experts] bool: token t -> experts (t*topk + j) mod num_experts, j < topk. The
    values t*topk + j enumerate 0..tokens*topk-1 once, so every expert gets tokens*topk/num_experts
    rows (exact when divisible), and a token's topk experts are distinct (topk <= num_experts)."""
    idx = (torch.arange(tokens).unsqueeze(1) * topk + torch.arange(topk).unsqueeze(0)) % num_experts
    return torch.zeros(tokens, num_experts, dtype=torch.bool).scatter_(1, idx, True)


def _exact_routing(logits: torch.Tensor, padding_mask=None, *, routing_map: torch.Tensor):
    """Stand-in for TopKRouter.routing with a fixed balanced map: probabilities are the softmax
    scores of the chosen experts (Megatron's pre-softmax top-k semantics), so gradients still
    reach the router."""
    logits = logits.view(-1, routing_map.shape[1])
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
    return scores * routing_map, routing_map


def _free() -> None:
    gc.collect()
    try:  # hand freed arenas back so one G's peak does not stay resident for the next
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------
# Benchmarks


def bench_experts(args: argparse.Namespace, granularity: int) -> dict:
    """Experts only, fwd+bwd, on exactly balanced dispatched rows."""
    from megatron.core.models.backends import LocalSpecProvider

    from megatron_moe_ext.layers.fine_grained_experts import FineGrainedExperts

    cfg_meg = make_config(args, granularity, "megatron")
    cfg_ours = make_config(args, granularity, "grouped")
    pgc = _pg_collection()
    num_experts, topk = cfg_meg.num_moe_experts, cfg_meg.moe_router_topk
    rows = args.tokens * topk
    per_expert = rows // num_experts
    assert per_expert * num_experts == rows
    modules = {
        "megatron": LocalSpecProvider().grouped_mlp_modules(False)(num_experts, cfg_meg, pg_collection=pgc),
        "ours": FineGrainedExperts(num_experts, cfg_ours, pg_collection=pgc),
    }
    copy_sequential_into_stacked(modules["megatron"], modules["ours"])
    for module in modules.values():
        module.train()

    gen = torch.Generator().manual_seed(1000 + granularity)
    x = torch.randn(rows, args.hidden, generator=gen).requires_grad_()
    probs = (torch.rand(rows, generator=gen) + 0.5).requires_grad_()  # any positive weights
    grad_out = torch.randn(rows, args.hidden, generator=gen)
    tokens_per_expert = torch.full((num_experts,), per_expert, dtype=torch.long)

    def clear(name: str) -> None:
        x.grad = None
        probs.grad = None
        modules[name].zero_grad(set_to_none=True)

    def step(name: str):
        def run() -> torch.Tensor:
            out, _ = modules[name](x, tokens_per_expert, probs)
            out.backward(grad_out)
            return out
        return run

    fns = {name: step(name) for name in ("ours", "megatron")}

    # Same math check (one untimed pass each).
    results = {}
    for name in ("megatron", "ours"):
        clear(name)
        out = fns[name]().detach()
        results[name] = (out, x.grad.clone(), probs.grad.clone())
    diffs = [check_close(f"G={granularity} experts output", results["ours"][0], results["megatron"][0], atol=OUT_ATOL)]
    diffs.append(check_close(f"G={granularity} experts input grad", results["ours"][1], results["megatron"][1]))
    diffs.append(check_close(f"G={granularity} experts probs grad", results["ours"][2], results["megatron"][2]))
    for proj in ("linear_fc1", "linear_fc2"):
        stacked = torch.stack([_grad_of(getattr(e, proj).weight) for e in modules["megatron"].local_experts])
        diffs.append(check_close(f"G={granularity} experts {proj} grad", _grad_of(getattr(modules["ours"], proj).weight), stacked))
    del results, out, stacked

    # The dense bound (not the same math, so not checked against the others): untimed first call
    # here, like the check pass of the two sides.
    fns["dense_bound"], clear_dense = dense_bound_step(args, cfg_meg, gen)
    clear_dense()
    fns["dense_bound"]()

    def clear_any(name: str) -> None:
        if name == "dense_bound":
            clear_dense()
        else:
            clear(name)

    samples: dict[str, list[float]] = {}
    cpu_samples: dict[str, list[float]] = {}
    # The check pass above was the first warm-up round (one untimed call per side, in alternating
    # order with the next round); --warmup counts it.
    medians = interleaved_medians(fns, args.repeats, max(0, args.warmup - 1), setup=clear_any, samples=samples,
                                  cpu_samples=cpu_samples)
    row = dict(
        what="experts", G=granularity, experts=num_experts, expert_ffn=cfg_meg.moe_ffn_hidden_size, topk=topk,
        rows=rows, max_over_mean=1.0, medians=medians, samples=samples, cpu_samples=cpu_samples, max_diff=diffs[0],
    )
    del modules, fns, x, probs, grad_out
    _free()
    return row


def dense_bound_step(args: argparse.Namespace, cfg, gen: torch.Generator):
    """(run, clear) for one dense MLP fwd+bwd with the experts' GEMM FLOPs: all ``tokens`` rows
    through hidden size k0*ffn (the sum of a token's k0*G experts of ffn/G each), the experts'
    activation, no probabilities, no bias; input and weight gradients like the experts."""
    ffn = args.base_topk * args.ffn
    fc1_rows = 2 * ffn if cfg.gated_linear_unit else ffn
    x_TH = torch.randn(args.tokens, args.hidden, generator=gen).requires_grad_()
    w1_F1H = (0.02 * torch.randn(fc1_rows, args.hidden, generator=gen)).requires_grad_()
    w2_HF = (0.02 * torch.randn(args.hidden, ffn, generator=gen)).requires_grad_()
    grad_TH = torch.randn(args.tokens, args.hidden, generator=gen)

    def activation(h: torch.Tensor) -> torch.Tensor:
        if cfg.gated_linear_unit:
            gate, up = torch.chunk(h, 2, dim=-1)
            return cfg.activation_func(gate) * up
        return cfg.activation_func(h)

    def run() -> torch.Tensor:
        out = torch.nn.functional.linear(activation(torch.nn.functional.linear(x_TH, w1_F1H)), w2_HF)
        out.backward(grad_TH)
        return out

    def clear() -> None:
        for t in (x_TH, w1_F1H, w2_HF):
            t.grad = None

    return run, clear


def bench_layer(args: argparse.Namespace, granularity: int) -> dict:
    """Whole MoELayer fwd+bwd: router + dispatcher (EP=1) + experts + combine."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_moe_ext.specs import moe_ext_gpt_block_spec

    force = args.layer_routing == "megatron"
    configs = {
        "megatron": make_config(args, granularity, "megatron", args.dispatcher, force),
        "ours": make_config(args, granularity, "grouped", args.dispatcher, force),
    }
    layers = {}
    for name, cfg in configs.items():
        mlp_builder = moe_ext_gpt_block_spec(cfg).layer_specs[0].submodules.mlp
        layer = mlp_builder(config=cfg, layer_number=1, pg_collection=_pg_collection(), is_mtp_layer=False)
        layer.train()
        layers[name] = layer
    if args.layer_routing == "exact":
        cfg = configs["megatron"]
        mask = exact_balanced_routing_map(args.tokens, cfg.num_moe_experts, cfg.moe_router_topk)
        for layer in layers.values():
            layer.router.routing = functools.partial(_exact_routing, routing_map=mask)
    experts_type = {name: type(layer.experts).__name__ for name, layer in layers.items()}
    assert experts_type == {"megatron": "SequentialMLP", "ours": "FineGrainedExperts"}, experts_type
    with torch.no_grad():
        layers["ours"].router.load_state_dict(layers["megatron"].router.state_dict())
    copy_sequential_into_stacked(layers["megatron"].experts, layers["ours"].experts)
    n_meg = sum(p.numel() for p in layers["megatron"].parameters())
    n_ours = sum(p.numel() for p in layers["ours"].parameters())
    assert n_meg == n_ours, (n_meg, n_ours)

    cfg = configs["megatron"]
    gen = torch.Generator().manual_seed(2000 + granularity)
    hidden = torch.randn(args.tokens, 1, args.hidden, generator=gen).requires_grad_()
    grad_out = torch.randn(args.tokens, 1, args.hidden, generator=gen)
    tracker = get_cuda_rng_tracker()
    rng_snapshot = dict(tracker.get_states())
    counts_seen: list[torch.Tensor] = []

    def record_counts(module, inputs):
        counts_seen.append(torch.as_tensor(inputs[1]).detach().clone())

    hooks = [layer.experts.register_forward_pre_hook(record_counts) for layer in layers.values()]

    def clear(name: str) -> None:
        hidden.grad = None
        layers[name].zero_grad(set_to_none=True)
        tracker.set_states(dict(rng_snapshot))  # identical random router logits on both sides
        counts_seen.clear()

    def step(name: str):
        def run() -> torch.Tensor:
            out, _ = layers[name](hidden)
            out.backward(grad_out)
            return out
        return run

    fns = {name: step(name) for name in ("ours", "megatron")}

    results, counts = {}, {}
    for name in ("megatron", "ours"):
        clear(name)
        out = fns[name]().detach()
        counts[name] = counts_seen[0].clone()
        grads = {n: _grad_of(p).clone() for n, p in layers[name].router.named_parameters()}
        results[name] = (out, hidden.grad.clone(), grads)
    if not torch.equal(counts["ours"], counts["megatron"]):
        raise SystemExit(f"check failed: G={granularity} layer: the two layers routed differently")
    diffs = [check_close(f"G={granularity} layer output", results["ours"][0], results["megatron"][0], atol=OUT_ATOL)]
    diffs.append(check_close(f"G={granularity} layer input grad", results["ours"][1], results["megatron"][1]))
    for pname, grad in results["megatron"][2].items():
        diffs.append(check_close(f"G={granularity} layer router {pname} grad", results["ours"][2][pname], grad))
    for proj in ("linear_fc1", "linear_fc2"):
        stacked = torch.stack([_grad_of(getattr(e, proj).weight) for e in layers["megatron"].experts.local_experts])
        diffs.append(check_close(f"G={granularity} layer {proj} grad", _grad_of(getattr(layers["ours"].experts, proj).weight), stacked))
    tpe = counts["megatron"].float()
    max_over_mean = (tpe.max() / tpe.mean()).item()
    del results, out, stacked

    samples: dict[str, list[float]] = {}
    cpu_samples: dict[str, list[float]] = {}
    # The check pass above was the first warm-up round (one untimed call per side, in alternating
    # order with the next round); --warmup counts it.
    medians = interleaved_medians(fns, args.repeats, max(0, args.warmup - 1), setup=clear, samples=samples,
                                  cpu_samples=cpu_samples)
    for hook in hooks:
        hook.remove()
    row = dict(
        what="layer", G=granularity, experts=cfg.num_moe_experts, expert_ffn=cfg.moe_ffn_hidden_size,
        topk=cfg.moe_router_topk, rows=args.tokens * cfg.moe_router_topk, max_over_mean=max_over_mean,
        medians=medians, samples=samples, cpu_samples=cpu_samples, max_diff=diffs[0],
    )
    del layers, fns, hidden, grad_out
    _free()
    return row


# ---------------------------------------------------------------------------------------------
# Reporting


def ratios(row: dict) -> dict[str, float]:
    """The comparisons of one row: ratio of wall-time medians (the result), and two noise checks."""
    med = row["medians"]
    per_round = sorted(1.0 / r for r in paired_ratios(row["samples"], "ours", "megatron"))
    cpu = row["cpu_samples"]
    return dict(
        time_ratio=med["ours"] / med["megatron"],
        speedup=med["megatron"] / med["ours"],
        paired_median=statistics.median(per_round),
        paired_min=per_round[0],
        paired_max=per_round[-1],
        cpu_speedup=statistics.median(cpu["megatron"]) / statistics.median(cpu["ours"]),
    )


def bound_ratios(row: dict) -> dict[str, float] | None:
    """Against the dense bound (experts rows only): megatron/dense = the largest speed-up possible
    at dense-GEMM efficiency, and ours/dense = how far ours is from it (1.0 = at the bound)."""
    med = row["medians"]
    if "dense_bound" not in med:
        return None
    return {"max_speedup": med["megatron"] / med["dense_bound"], "ours_over_bound": med["ours"] / med["dense_bound"]}


def describe(row: dict) -> str:
    med, r, b = row["medians"], ratios(row), bound_ratios(row)
    balance = "" if row["what"] == "experts" else f", routed max/mean per expert {row['max_over_mean']:.3f}"
    bound = "" if b is None else (
        f" | dense bound {1e3 * med['dense_bound']:.1f} ms: largest speed-up possible at dense-GEMM efficiency "
        f"(megatron/dense bound) {b['max_speedup']:.2f}x, ours/dense bound time {b['ours_over_bound']:.2f}"
    )
    return (
        f"G={row['G']:>3} {row['what']:<7}: ours/megatron time {r['time_ratio']:.3f} | speed-up megatron/ours "
        f"{r['speedup']:.2f}x | tokens/s ratio ours/megatron {r['speedup']:.2f}x | per-repeat speed-up median "
        f"{r['paired_median']:.2f}x (min {r['paired_min']:.2f}, max {r['paired_max']:.2f}) | CPU-time speed-up "
        f"{r['cpu_speedup']:.2f}x (median ms: ours {1e3 * med['ours']:.1f}, megatron {1e3 * med['megatron']:.1f}; "
        f"{row['experts']} experts of {row['expert_ffn']}, top-{row['topk']}, {row['rows']} routed rows{balance}; "
        f"max |out diff| {row['max_diff']:.1e}){bound}"
    )


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    headers = ["benchmark", "G", "experts x ffn", "top-k", "ours/megatron time", "speed-up = tokens/s ratio",
               "per-repeat speed-up median (min-max)", "CPU-time speed-up", "ours ms", "megatron ms",
               "dense bound ms", "largest speed-up possible at dense-GEMM efficiency (megatron/dense bound)",
               "ours/dense bound time"]
    out = []
    for row in rows:
        med, r, b = row["medians"], ratios(row), bound_ratios(row)
        name = "experts" if row["what"] == "experts" else f"MoELayer (max/mean {row['max_over_mean']:.2f})"
        out.append([
            name, str(row["G"]), f"{row['experts']} x {row['expert_ffn']}", str(row["topk"]),
            f"{r['time_ratio']:.3f}", f"{r['speedup']:.2f}x",
            f"{r['paired_median']:.2f}x ({r['paired_min']:.2f}-{r['paired_max']:.2f})", f"{r['cpu_speedup']:.2f}x",
            f"{1e3 * med['ours']:.0f}", f"{1e3 * med['megatron']:.0f}",
            *(["-"] * 3 if b is None else [f"{1e3 * med['dense_bound']:.0f}", f"{b['max_speedup']:.2f}x",
                                          f"{b['ours_over_bound']:.2f}"]),
        ])
    return headers, out


def retention(rows: list[dict], what: str) -> tuple[int, int, dict[str, float]] | None:
    """time(G_min)/time(G_max) per token (tokens are constant, so a ratio of times), per side."""
    by_g = {r["G"]: r for r in rows if r["what"] == what}
    if len(by_g) < 2:
        return None
    lo, hi = min(by_g), max(by_g)
    return lo, hi, {side: by_g[lo]["medians"][side] / by_g[hi]["medians"][side] for side in ("ours", "megatron")}


def goals(rows: list[dict]) -> list[str]:
    """The issue's goals, each MET / NOT MET / not measured, per benchmark."""
    lines = []
    for what in ("experts", "layer"):
        sel = [r for r in rows if r["what"] == what]
        if not sel:
            continue
        label = "experts" if what == "experts" else "MoELayer"
        speedups = {r["G"]: r["medians"]["megatron"] / r["medians"]["ours"] for r in sel}
        big = {g: s for g, s in speedups.items() if g >= 16}
        if big:
            ok = all(s >= 3.0 for s in big.values())
            detail = ", ".join(f"G={g}: {s:.2f}x" for g, s in sorted(big.items()))
            lines.append(f"[{label}] >= 3x faster than SequentialMLP at G >= 16: {'MET' if ok else 'NOT MET'} ({detail})")
            for row in sorted(sel, key=lambda r: r["G"]):
                b = bound_ratios(row)
                if row["G"] < 16 or b is None:
                    continue
                verdict = ("within the bound" if b["max_speedup"] >= 3.0
                           else "NOT reachable by any implementation of these FLOPs")
                lines.append(
                    f"[{label}] G={row['G']}: 3x is {verdict} (largest speed-up possible at dense-GEMM efficiency, "
                    f"megatron/dense bound, {b['max_speedup']:.2f}x; ours {speedups[row['G']]:.2f}x, ours/dense bound "
                    f"time {b['ours_over_bound']:.2f})"
                )
        else:
            lines.append(f"[{label}] >= 3x faster at G >= 16: not measured (no G >= 16 in this run)")
        if 1 in speedups:
            r1 = 1.0 / speedups[1]
            lines.append(f"[{label}] not slower than 1.05x at G = 1: {'MET' if r1 <= 1.05 else 'NOT MET'} "
                         f"(ours/megatron time {r1:.3f})")
        else:
            lines.append(f"[{label}] not slower than 1.05x at G = 1: not measured (G=1 not in this run)")
        ret = retention(rows, what)
        if ret is not None and ret[0] == 1 and ret[1] == 64:
            lo, hi, values = ret
            lines.append(f"[{label}] efficiency retention time(G=1)/time(G=64) per token >= 0.5: "
                         f"{'MET' if values['ours'] >= 0.5 else 'NOT MET'} (ours {values['ours']:.3f}; "
                         f"megatron {values['megatron']:.3f})")
        else:
            lines.append(f"[{label}] efficiency retention time(G=1)/time(G=64): not measured (needs G=1 and G=64)")
    return lines


def markdown_section(args: argparse.Namespace, machine: dict, command: str, rows: list[dict],
                     goal_lines: list[str], elapsed_s: float) -> str:
    headers, body = table_rows(rows)
    parts = [
        f"## {SECTION_TITLE}",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} in {elapsed_s / 60:.1f} min.",
        "",
        "Machine:",
        "",
        *[f"- {k}: {v}" for k, v in machine.items()],
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"Setting: hidden {args.hidden}, dense ffn {args.ffn}, E={args.expansion}, k0={args.base_topk}, "
        f"{args.tokens} tokens, fp32, gelu non-gated experts without biases (the paper's setting), "
        f"forward + backward; median of {args.repeats} interleaved repeats after {args.warmup} warm-up round(s) "
        "(the first being the correctness check). "
        + ("Experts benchmark: exactly equal rows per expert; the dense bound (timed interleaved with both) is "
           f"one dense MLP of hidden {args.base_topk * args.ffn} over all {args.tokens} tokens, the experts' GEMM "
           "FLOPs as two big GEMMs, so megatron/dense bound is the largest speed-up possible at dense-GEMM "
           "efficiency. " if args.what != "layer" else "")
        + (("MoELayer benchmark: "
            + ("`moe_router_force_load_balancing` (random logits, near-balanced)" if args.layer_routing == "megatron"
               else "exactly balanced routing (token t -> experts (t*k+j) mod N)")
            + f", {args.dispatcher} dispatcher at EP=1, identical routing on both sides; max/mean is the largest "
            "expert's rows over the mean. ") if args.what != "experts" else "")
        + f"Outputs and gradients checked equal (outputs: max abs diff <= {OUT_ATOL:g}) before timing.",
        "",
        markdown_table(headers, body),
        "",
    ]
    for what, label in (("experts", "experts"), ("layer", "MoELayer")):
        ret = retention(rows, what)
        if ret is not None:
            lo, hi, values = ret
            parts.append(f"- Efficiency retention time(G={lo})/time(G={hi}) per token, {label}: ours "
                         f"{values['ours']:.3f}, megatron {values['megatron']:.3f}")
    parts += ["", "Goals:", "", *[f"- {line}" for line in goal_lines], ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, _REPO), *(sys.argv[1:] if argv is None else argv)])
    setup_runtime(args.threads)
    machine = machine_description()
    print("Fine-grained experts (ours, backend 'grouped') vs Megatron SequentialMLP, CPU, fp32, forward+backward; "
          "experts also against the dense bound (one dense MLP, same FLOPs)")
    print(f"setting: hidden {args.hidden}, dense ffn {args.ffn}, E={args.expansion}, k0={args.base_topk}, "
          f"{args.tokens} tokens, gelu non-gated MLP (paper's setting), no biases; constant active and total "
          f"parameters over G; median of {args.repeats} interleaved repeats (order alternating), "
          f"{args.warmup} warm-up round(s)")
    for key, value in machine.items():
        print(f"  {key}: {value}")
    sys.stdout.flush()

    start = time.perf_counter()
    rows: list[dict] = []
    for g in args.granularities:
        for what, bench in (("experts", bench_experts), ("layer", bench_layer)):
            if args.what not in (what, "both"):
                continue
            row = bench(args, g)
            rows.append(row)
            print(describe(row), flush=True)
    elapsed = time.perf_counter() - start

    headers, body = table_rows(rows)
    print()
    print(text_table(headers, body))
    print()
    for what, label in (("experts", "experts"), ("layer", "MoELayer")):
        ret = retention(rows, what)
        if ret is not None:
            lo, hi, values = ret
            print(f"efficiency retention time(G={lo})/time(G={hi}) per token, {label}: ours {values['ours']:.3f}, "
                  f"megatron {values['megatron']:.3f}")
    goal_lines = goals(rows)
    print("goals:")
    for line in goal_lines:
        print(f"  {line}")
    print(f"total {elapsed:.0f} s")
    if args.markdown is not None:
        section = markdown_section(args, machine, command, rows, goal_lines, elapsed)
        prefix = "\n" if args.markdown.exists() and args.markdown.stat().st_size else ""
        with open(args.markdown, "a", encoding="utf-8") as handle:
            handle.write(prefix + section)
        print(f"appended results to {args.markdown}")
    teardown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
