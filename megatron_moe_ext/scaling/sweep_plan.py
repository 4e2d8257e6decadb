"""The compute-matched grid of a granularity sweep (pure arithmetic; no torch, no Megatron).

For each compute budget C (training FLOPs), base shape (hidden size h), granularity G, expansion rate E and
seed, one fine-grained MoE run (Krajewski, Ludziejewski et al. 2024, arXiv 2402.07871, Sec. 3: experts = E*G
of size d_ff/G, top-k = k0*G, so the active parameters and FLOPs per token do not depend on G except for the
router term 2*h*E*G). Its tokens are D = C / F, F = training FLOPs per token from ``accounting.account``
(router included), rounded to whole iterations of ``global_batch_size * seq_length`` tokens; the FLOPs it
actually spends are recorded (``flops = F * tokens``).

Dense baselines per (budget, shape, seed):
* ``dense_equal_compute``: one FFN of k0 * d_ff (the active expert width), so the same FLOPs per token as every
  MoE run less its router term, and about the same tokens;
* ``dense_equal_params`` (per expansion rate E): one FFN of E * d_ff (the total expert width, the "wide dense"
  model): about the MoE's total parameters, so more FLOPs per token and fewer tokens at the same budget.

Router axis (``routers``, issue #22): every MoE point is planned once per router variant, at equal mean compute
(the same expected real experts per token, ``accounting.expected_active_experts``):
* ``topk``: Megatron's top-k token choice, k = k0*G (run names as without the axis);
* ``product_key``: product-key top-k (same k; the experts must form a grid);
* ``expert_choice``: each expert takes its top-c tokens, capacity factor 1 (f*k = k experts per token on average);
* ``relu``: ReLU gates (ReMoE), target sparsity 1 - k/N (the default: (1 - S)*N = k active experts);
* ``null``: top-2k over N real + M = N null experts (``NULL_EXPERTS_PER_EXPERT``): 2k * N/(N + M) = k real
  experts per token under balanced routing (MoE++), via ``--moe-base-topk 2*k0``.
The router term differs (null experts double the router's outputs), so tokens differ slightly, as across G.

The model's architecture flags are those of the embedded demo (``ARCH_FLAGS``: SwiGLU, RMSNorm, RoPE, no biases,
untied embeddings); every command states them and every size flag explicitly, so the accounting is that of the
command whatever defaults ``megatron-moe-ext train`` would otherwise add.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from megatron_moe_ext.accounting import Accounting, ModelShape, account, padded_vocab_size
from megatron_moe_ext.settings.granularity import _divisors, derive_fine_grained
from megatron_moe_ext.training.data import VOCAB_SIZE

KINDS = ("moe", "dense_equal_compute", "dense_equal_params")
# Router variants of the router axis and their flags (k0 doubled for "null", see the module docstring).
ROUTER_VARIANTS = ("topk", "product_key", "expert_choice", "relu", "null")
NULL_EXPERTS_PER_EXPERT = 1

# Architecture flags every planned command carries (the embedded demo's; ModelShape fields below match them).
ARCH_FLAGS: tuple[str, ...] = (
    "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights",
)
_ARCH_SHAPE = dict(gated_linear_unit=True, normalization="RMSNorm", add_bias_linear=False,
                   share_embeddings_and_output_weights=False, position_embedding_type="rope")
# Flags the planner sets itself: passing them after `--` would silently change what was accounted.
PLANNER_FLAGS = frozenset({
    "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--seq-length",
    "--max-position-embeddings", "--global-batch-size", "--micro-batch-size", "--train-iters", "--eval-interval",
    "--eval-iters", "--save-interval", "--save", "--load", "--seed", "--moe-granularity", "--moe-expansion-rate",
    "--moe-base-topk", "--num-experts", "--moe-router-topk", "--moe-ffn-hidden-size", "--moe-layer-freq",
    "--expert-model-parallel-size", "--nproc", "--ext-loss-log", "--log-interval", "--swiglu", "--normalization",
    "--position-embedding-type", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--moe-router-type", "--moe-null-experts", "--moe-ec-capacity-factor", "--moe-relu-target-sparsity",
    "--moe-token-dispatcher-type",
})


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """Everything ``sweep plan`` needs; checked by ``check_spec`` (and ``plan_runs``)."""

    budgets: tuple[float, ...]
    hidden_sizes: tuple[int, ...]
    granularities: tuple[int, ...]
    expansion_rates: tuple[int, ...]
    base_topk: int = 2
    seeds: tuple[int, ...] = (1234,)
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    seq_length: int = 128
    vocab_size: int = VOCAB_SIZE  # the embedded demo's byte tokeniser
    global_batch_size: int = 16
    micro_batch_size: int = 8
    nproc: int = 2
    expert_parallel_size: int = 2
    max_iters: int | None = None
    save_interval: int = 100
    eval_iters: int = 4
    dense_baselines: bool = True
    routers: tuple[str, ...] = ("topk",)
    extra_args: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RouterVariant:
    """One router of the router axis: its name-suffix, flags, accounting fields and base top-k."""

    name: str
    flags: tuple[str, ...]
    shape: dict[str, Any]
    base_topk: int


# Rows with a variable number of experts run with Megatron's allgather dispatcher (it counts the routed tokens;
# alltoall needs the integration row variable-experts-alltoall), one dispatcher for every variable-row run.
_VARIABLE_ROWS = ("--moe-token-dispatcher-type", "allgather")
# Balancing flags the expert-choice router refuses (settings/expert_choice.py), so extra flags may not add them.
_EC_REFUSED = frozenset({"--moe-router-load-balancing-type", "--moe-aux-loss-coeff", "--moe-balance-losses",
                         "--moe-balance-metrics"})


def router_variant(name: str, base_topk: int, num_experts: int) -> RouterVariant:
    """The flags and accounting of router ``name`` at the mean compute of top-(k0*G) token choice
    (``num_experts``: the real experts N of the point; only "null" uses it, M = N)."""
    if name == "topk":
        return RouterVariant(name, (), {}, base_topk)
    if name == "product_key":
        return RouterVariant(name, ("--moe-router-type", "product_key"), dict(router_type="product_key"), base_topk)
    if name == "expert_choice":
        return RouterVariant(name, ("--moe-router-type", "expert_choice", "--moe-ec-capacity-factor", "1.0",
                                    "--moe-aux-loss-coeff", "0", *_VARIABLE_ROWS),
                             dict(router_type="expert_choice", ec_capacity_factor=1.0), base_topk)
    if name == "relu":
        return RouterVariant(name, ("--moe-router-type", "relu", *_VARIABLE_ROWS), dict(router_type="relu"), base_topk)
    if name == "null":
        m = NULL_EXPERTS_PER_EXPERT * num_experts
        return RouterVariant(name, ("--moe-null-experts", str(m), *_VARIABLE_ROWS), dict(null_experts=m),
                             base_topk * (1 + NULL_EXPERTS_PER_EXPERT))
    raise ValueError(f"router {name!r} is unknown; fix: --routers from {', '.join(ROUTER_VARIANTS)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannedRun:
    """One row of the runs table; ``train_args`` are the flags after ``megatron-moe-ext train`` (paths relative
    to the run's own directory)."""

    run: str
    kind: str
    seed: int
    budget_flops: float
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int  # the dense FFN of the run (the base d_ff for MoE runs)
    granularity: int | None
    expansion_rate: int | None
    experts: int | None
    topk: int | None
    expert_size: int | None
    iterations: int
    tokens: int
    flops: int
    params: int
    total_params: int
    training_flops_per_token: int
    router_flops_per_token: int
    train_args: tuple[str, ...]
    router: str | None = None  # the router variant (ROUTER_VARIANTS) of a MoE run; None for dense baselines
    null_experts: int = 0
    active_experts: float | None = None  # expected real experts per token per MoE layer (nominal)

    def row(self) -> dict[str, Any]:
        """The CSV/JSON row (train_args as one shell-quoted command string ``command``)."""
        import shlex

        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train_args"}
        out["command"] = shlex.join(["megatron-moe-ext", "train", *self.train_args])
        return out


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer; fix: pass a value >= 1")


def format_budget(budget: float) -> str:
    """1e13 -> '1e13', 3.5e13 -> '3.5e13' (run names)."""
    mantissa, exponent = f"{budget:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def check_spec(spec: SweepSpec) -> None:
    """Everything about the spec that does not depend on a budget; ValueError naming the values and the fix."""
    for name in ("num_layers", "num_attention_heads", "ffn_hidden_size", "seq_length", "vocab_size",
                 "global_batch_size", "micro_batch_size", "nproc", "expert_parallel_size", "save_interval",
                 "eval_iters", "base_topk"):
        _positive(name, getattr(spec, name))
    for name in ("budgets", "hidden_sizes", "granularities", "expansion_rates", "seeds", "routers"):
        values = getattr(spec, name)
        if not values:
            raise ValueError(f"{name} is empty; fix: give at least one value")
        if len(set(values)) != len(values):
            raise ValueError(f"{name}={list(values)} repeats a value; fix: list each value once")
    for b in spec.budgets:
        if not (isinstance(b, (int, float)) and math.isfinite(b) and b > 0):
            raise ValueError(f"budget {b!r} FLOPs must be a positive finite number; fix: e.g. --flops 1e13,3e13")
    names = [format_budget(b) for b in spec.budgets]
    if len(set(names)) != len(names):
        raise ValueError(f"budgets {list(spec.budgets)} name the same runs ({names}, 4 significant digits); fix: "
                         "budgets that differ in their first 4 significant digits")
    if spec.max_iters is not None:
        _positive("max_iters", spec.max_iters)
    for h in spec.hidden_sizes:
        _positive("hidden_size", h)
        if h % spec.num_attention_heads:
            valid = _divisors(h)
            raise ValueError(
                f"hidden size {h} is not divisible by num_attention_heads={spec.num_attention_heads}; fix: choose "
                f"heads dividing every hidden size (divisors of {h}: {valid}) or hidden sizes that are multiples of "
                f"{spec.num_attention_heads}"
            )
    for g in spec.granularities:
        _positive("granularity", g)
        if spec.ffn_hidden_size % g:
            raise ValueError(
                f"granularity G={g} does not divide ffn_hidden_size={spec.ffn_hidden_size} (expert size "
                f"{spec.ffn_hidden_size / g:g}); fix: use G in {_divisors(spec.ffn_hidden_size)}"
            )
    dp = spec.nproc  # no TP/PP here: every rank is a data-parallel replica of the dense part
    if spec.nproc % spec.expert_parallel_size:
        raise ValueError(
            f"nproc={spec.nproc} is not a multiple of expert_parallel_size={spec.expert_parallel_size}; fix: "
            f"--nproc a multiple of {spec.expert_parallel_size} or a smaller --expert-parallel-size"
        )
    if spec.global_batch_size % (spec.micro_batch_size * dp):
        raise ValueError(
            f"global_batch_size={spec.global_batch_size} is not a multiple of micro_batch_size x data-parallel "
            f"ranks = {spec.micro_batch_size} x {dp}; fix: a global batch that is a multiple of "
            f"{spec.micro_batch_size * dp}"
        )
    unknown = [r for r in spec.routers if r not in ROUTER_VARIANTS]
    if unknown:
        raise ValueError(f"routers {unknown} are unknown; fix: --routers from {', '.join(ROUTER_VARIANTS)}")
    balancing = sorted({a.split("=", 1)[0] for a in spec.extra_args} & _EC_REFUSED)
    if "expert_choice" in spec.routers and balancing:
        raise ValueError(
            f"extra train flags {balancing} with the expert_choice router: expert choice is balanced by construction "
            "and refuses balance losses and metrics (its runs get --moe-aux-loss-coeff 0); fix: drop them, or leave "
            "expert_choice out of --routers")
    for g in spec.granularities:
        for e in spec.expansion_rates:
            _positive("expansion_rate", e)
            sizes = derive_fine_grained(spec.ffn_hidden_size, g, e, spec.base_topk,
                                        expert_parallel_size=spec.expert_parallel_size)
            for r in spec.routers:
                variant = router_variant(r, spec.base_topk, sizes.num_experts)
                try:
                    derive_fine_grained(spec.ffn_hidden_size, g, e, variant.base_topk,
                                        expert_parallel_size=spec.expert_parallel_size)
                except ValueError as err:
                    raise ValueError(f"router {r} at G={g}, E={e} (base top-k {variant.base_topk}): {err}") from None
    clash = sorted({a.split("=", 1)[0] for a in spec.extra_args} & PLANNER_FLAGS)
    if clash:
        raise ValueError(
            f"extra train flags {clash} are set by the planner (shape, schedule, paths, granularity); fix: use the "
            "planner's options (see `megatron-moe-ext sweep plan --help`) instead of passing them after --"
        )
    vocab = [a.split("=", 1)[1] if "=" in a else spec.extra_args[i + 1] if i + 1 < len(spec.extra_args) else ""
             for i, a in enumerate(spec.extra_args) if a.split("=", 1)[0] == "--vocab-size"]
    if vocab and vocab[-1] != str(spec.vocab_size):
        raise ValueError(
            f"train flag --vocab-size {vocab[-1]} differs from the planner's --vocab-size {spec.vocab_size} (used for "
            f"the accounting); fix: pass --vocab-size {vocab[-1]} to `sweep plan` as well"
        )


def _shape(spec: SweepSpec, hidden: int, *, ffn: int, moe: tuple[int, int, int] | None,
           router: dict[str, Any] | None = None) -> ModelShape:
    experts, expert_size, topk = moe if moe else (None, None, None)
    return ModelShape(
        num_layers=spec.num_layers, hidden_size=hidden, num_attention_heads=spec.num_attention_heads,
        ffn_hidden_size=ffn, vocab_size=padded_vocab_size(spec.vocab_size), seq_length=spec.seq_length,
        max_position_embeddings=spec.seq_length, num_experts=experts, moe_ffn_hidden_size=expert_size, topk=topk,
        moe_layer_pattern=(1,) * spec.num_layers if moe else (0,) * spec.num_layers, **_ARCH_SHAPE, **(router or {}),
    )


def _iterations(spec: SweepSpec, budget: float, acc: Accounting) -> int:
    return round(budget / (acc.training_flops_per_token * spec.global_batch_size * spec.seq_length))


def _check_iterations(spec: SweepSpec, configs: Sequence[tuple[str, float, Accounting]]) -> None:
    """Every (run, budget, accounting) gets >= 1 and <= --max-iters iterations, or ValueError naming the runs
    and the budgets that fit all of them."""
    per_iter = {name: acc.training_flops_per_token * spec.global_batch_size * spec.seq_length
                for name, _, acc in configs}
    low = [(name, budget) for name, budget, acc in configs if _iterations(spec, budget, acc) < 1]
    if low:
        listed = ", ".join(f"{name} ({budget / per_iter[name]:.3g} iterations)" for name, budget in low[:4])
        more = f" and {len(low) - 4} more" if len(low) > 4 else ""
        raise ValueError(
            f"{len(low)} run(s) get less than 1 iteration of {spec.global_batch_size} x {spec.seq_length} tokens: "
            f"{listed}{more}; fix: budgets of at least {max(per_iter.values()):.4g} FLOPs (one iteration of the "
            "costliest run), or a smaller model/batch"
        )
    if spec.max_iters is None:
        return
    high = [(name, budget) for name, budget, acc in configs if _iterations(spec, budget, acc) > spec.max_iters]
    if high:
        listed = ", ".join(f"{name} ({_iterations(spec, budget, acc)} iterations)"
                           for name, budget, acc in configs if (name, budget) in high[:4])
        more = f" and {len(high) - 4} more" if len(high) > 4 else ""
        raise ValueError(
            f"{len(high)} run(s) need more than --max-iters {spec.max_iters} iterations: {listed}{more}; fix: budgets "
            f"of at most {spec.max_iters * min(per_iter.values()):.4g} FLOPs, a larger model, or a larger --max-iters"
        )


def _train_args(spec: SweepSpec, *, hidden: int, ffn: int, seed: int, iters: int,
                moe_flags: Sequence[str]) -> tuple[str, ...]:
    save = "ckpt"
    return (
        "--nproc", str(spec.nproc),
        "--num-layers", str(spec.num_layers), "--hidden-size", str(hidden), "--ffn-hidden-size", str(ffn),
        "--num-attention-heads", str(spec.num_attention_heads), "--seq-length", str(spec.seq_length),
        "--max-position-embeddings", str(spec.seq_length), *ARCH_FLAGS,
        *moe_flags, "--expert-model-parallel-size", str(spec.expert_parallel_size),
        "--global-batch-size", str(spec.global_batch_size), "--micro-batch-size", str(spec.micro_batch_size),
        "--train-iters", str(iters), "--eval-interval", str(iters), "--eval-iters", str(spec.eval_iters),
        "--save-interval", str(min(spec.save_interval, iters)), "--save", save, "--load", save,
        "--ext-loss-log", "loss.jsonl", "--log-interval", "1", "--seed", str(seed), *spec.extra_args,
    )


def plan_runs(spec: SweepSpec) -> list[PlannedRun]:
    """The whole grid, or ValueError (naming values and fix) before anything is written."""
    check_spec(spec)
    configs: list[tuple[Any, ...]] = []
    L = spec.num_layers
    for budget in spec.budgets:
        for hidden in spec.hidden_sizes:
            for seed in spec.seeds:
                tag = f"b{format_budget(budget)}_h{hidden}"
                for e in spec.expansion_rates:
                    for g in spec.granularities:
                        base = derive_fine_grained(spec.ffn_hidden_size, g, e, spec.base_topk,
                                                   expert_parallel_size=spec.expert_parallel_size)
                        for r in spec.routers:
                            v = router_variant(r, spec.base_topk, base.num_experts)
                            sizes = derive_fine_grained(spec.ffn_hidden_size, g, e, v.base_topk,
                                                        expert_parallel_size=spec.expert_parallel_size)
                            try:
                                acc = account(_shape(spec, hidden, ffn=spec.ffn_hidden_size, router=v.shape,
                                                     moe=(sizes.num_experts, sizes.moe_ffn_hidden_size, sizes.topk)))
                            except ValueError as err:
                                raise ValueError(f"router {r} at G={g}, E={e}: {err}") from None
                            moe_flags = ("--moe-granularity", str(g), "--moe-expansion-rate", str(e),
                                         "--moe-base-topk", str(v.base_topk), "--moe-layer-freq", "1", *v.flags)
                            suffix = "" if r == "topk" else f"_{r}"
                            configs.append((f"{tag}_G{g}_E{e}{suffix}_s{seed}", "moe", seed, budget, hidden,
                                            spec.ffn_hidden_size, acc, moe_flags,
                                            dict(g=g, e=e, expert_size=sizes.moe_ffn_hidden_size, router=r,
                                                 null_experts=v.shape.get("null_experts", 0))))
                if not spec.dense_baselines:
                    continue
                dense_flags = ("--moe-layer-freq", f"([0]*{L})")
                widths = [("dense_equal_compute", f"{tag}_dense-compute_s{seed}", spec.base_topk * spec.ffn_hidden_size)]
                widths += [("dense_equal_params", f"{tag}_dense-params-E{e}_s{seed}", e * spec.ffn_hidden_size)
                           for e in spec.expansion_rates]
                for kind, name, ffn in widths:
                    acc = account(_shape(spec, hidden, ffn=ffn, moe=None))
                    configs.append((name, kind, seed, budget, hidden, ffn, acc, dense_flags, {}))
    _check_iterations(spec, [(c[0], c[3], c[6]) for c in configs])
    runs = [_run(spec, name, kind, seed, budget, hidden, ffn, acc, _iterations(spec, budget, acc), flags, **more)
            for name, kind, seed, budget, hidden, ffn, acc, flags, more in configs]
    names = [r.run for r in runs]
    assert len(set(names)) == len(names), names
    return runs


def _run(spec: SweepSpec, name: str, kind: str, seed: int, budget: float, hidden: int, ffn: int, acc: Accounting,
         iters: int, moe_flags: Sequence[str], *, g: int | None = None, e: int | None = None,
         expert_size: int | None = None, router: str | None = None, null_experts: int = 0) -> PlannedRun:
    tokens = iters * spec.global_batch_size * spec.seq_length
    moe = kind == "moe"
    return PlannedRun(
        run=name, kind=kind, seed=seed, budget_flops=float(budget), num_layers=spec.num_layers, hidden_size=hidden,
        num_attention_heads=spec.num_attention_heads, ffn_hidden_size=ffn, granularity=g, expansion_rate=e,
        experts=acc.num_experts if moe else None, topk=acc.topk if moe else None, expert_size=expert_size,
        iterations=iters, tokens=tokens, flops=acc.training_flops_per_token * tokens,
        params=acc.active_params - acc.embedding_params, total_params=acc.total_params - acc.embedding_params,
        training_flops_per_token=acc.training_flops_per_token, router_flops_per_token=acc.router_flops_per_token,
        train_args=_train_args(spec, hidden=hidden, ffn=ffn, seed=seed, iters=iters, moe_flags=moe_flags),
        router=router if moe else None, null_experts=null_experts, active_experts=acc.active_experts if moe else None,
    )
