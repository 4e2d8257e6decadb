"""Compute-optimal (and memory-constrained) model size, tokens, granularity and experts for a FLOP budget.

Legend: C training FLOPs budget, N non-embedding parameters (active or total, as the law takes them),
D tokens, G granularity, R expansion rate (experts = R G at G = 1 sizes), k0 base top-k (top-k = k0 G),
h hidden size, L layers, M memory bound in bytes.

Two compute models:

* ``paper_optimum`` -- Krajewski et al. 2024, Sec. 6.1-6.2 exactly as stated: F = (12 d^2 c_f + d R G c_r)
  D n_blocks (Eq. 10, c_f = 6, c_r = 14), d = 64 n_blocks, N_total = d^2 (8R + 4) n_blocks; for each
  candidate G the one-dimensional problem in n_blocks is solved with Brent's method (scipy
  ``minimize_scalar``, bounded, on log n_blocks), D following from the budget; the best G wins. This is
  how Table 2 of the paper was produced (tests reproduce its optimal G at its seven budgets).
* ``accounting_optimum`` -- OUR accounting (``megatron_moe_ext.accounting.account``) of a concrete Megatron
  shape family: h = 64 L (the paper's aspect ratio), heads = h / 64, dense FFN 4h, every layer MoE with
  R G experts of size 4h / G and top-k k0 G; training FLOPs per token = 3 x forward (attention, experts,
  router, logits), D = C / that. Every (L, G, R) with D >= min_tokens (and, with a memory bound, total
  parameters x bytes_per_param <= M) is a candidate; the lowest predicted loss wins. Used for fitted laws
  (whose N is the accounting's active or total non-embedding parameter count, as fitted).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from scipy.optimize import minimize_scalar

from megatron_moe_ext.scaling import laws


@dataclasses.dataclass(frozen=True)
class Optimum:
    """One configuration and its accounting (all counts non-embedding unless named otherwise)."""

    flops: float  # budget C
    compute_model: str  # "krajewski2024-eq10" or "accounting"
    granularity: int
    expansion_rate: int
    experts: int  # routed experts per MoE layer = R G
    topk: int
    num_layers: float  # n_blocks (continuous in the paper's model)
    hidden_size: float
    expert_hidden_size: float
    active_params: float
    total_params: float
    tokens: float
    flops_per_token: float  # training FLOPs per token in the compute model
    flops_used: float
    predicted_loss: float
    memory_bytes: float | None = None  # total parameters (embeddings included where known) x bytes_per_param
    embedding_params: float = 0.0
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_budget(flops: float) -> None:
    if not (isinstance(flops, (int, float)) and math.isfinite(flops) and flops > 0):
        raise ValueError(f"--flops {flops!r} must be a finite number > 0; fix: e.g. --flops 1e21")


def paper_optimum(law: laws.Law, flops: float, *, granularities: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128),
                  expansion_rate: int = laws.KRAJEWSKI_EXPANSION, base_topk: int = 1,
                  min_tokens: float = 2048.0) -> Optimum:
    """Krajewski et al. 2024's optimisation of N, D, G at fixed FLOPs (module docstring); needs a krajewski2024
    law on total parameters (the paper's N)."""
    _check_budget(flops)
    if law.law != "krajewski2024":
        raise ValueError(f"the paper's compute model is Krajewski et al. 2024's; law {law.law} needs our accounting; "
                         "fix: plan it with --law-json (accounting_optimum)")
    if law.params != "total":
        raise ValueError("the paper's compute model takes total parameters; this law was fitted on active ones; "
                         "fix: plan it with our accounting (accounting_optimum)")
    best: Optimum | None = None
    n_max = 1e5
    for gran in granularities:
        def tokens(n: float) -> float:
            return flops / laws.krajewski2024_flops(n, 1.0, gran, expansion=expansion_rate)

        def loss(log_n: float) -> float:
            n = math.exp(log_n)
            total, _ = laws.krajewski2024_params(n, expansion=expansion_rate)
            return float(law.loss(total, tokens(n), granularity=gran))

        # Largest n_blocks that still trains on min_tokens (per-token cost grows with n).
        hi = math.log(n_max)
        if tokens(1.0) < min_tokens:
            continue
        if tokens(n_max) < min_tokens:
            lo_b, hi_b = 0.0, hi
            for _ in range(200):
                mid = 0.5 * (lo_b + hi_b)
                lo_b, hi_b = (mid, hi_b) if tokens(math.exp(mid)) >= min_tokens else (lo_b, mid)
            hi = lo_b
        res = minimize_scalar(loss, bounds=(0.0, hi), method="bounded", options={"xatol": 1e-9})
        n = math.exp(float(res.x))
        total, active = laws.krajewski2024_params(n, expansion=expansion_rate)
        d = laws.KRAJEWSKI_ASPECT * n
        per_token = laws.krajewski2024_flops(n, 1.0, gran, expansion=expansion_rate)
        cand = Optimum(
            flops=flops, compute_model="krajewski2024-eq10", granularity=int(gran), expansion_rate=int(expansion_rate),
            experts=int(expansion_rate * gran), topk=int(base_topk * gran), num_layers=n, hidden_size=d,
            expert_hidden_size=4.0 * d / gran, active_params=active, total_params=total, tokens=flops / per_token,
            flops_per_token=per_token, flops_used=flops, predicted_loss=float(res.fun),
            notes=("N, D continuous (Brent); routing parameters excluded from N as in the paper",),
        )
        if best is None or cand.predicted_loss < best.predicted_loss:
            best = cand
    if best is None:
        smallest = laws.krajewski2024_flops(1.0, min_tokens, min(granularities), expansion=expansion_rate)
        raise ValueError(f"--flops {flops:g} is below the smallest configuration of the paper's family (1 block, "
                         f"d_model 64, {min_tokens:g} tokens at G={min(granularities)} costs {smallest:.3g} FLOPs); "
                         f"fix: a budget >= {smallest:.3g}")
    return best


def family_shape(layers: int, granularity: int, expansion_rate: int, base_topk: int, *, vocab_size: int,
                 seq_length: int):
    """The shape family of ``accounting_optimum`` (module docstring), or None where G does not divide 4h."""
    from megatron_moe_ext.accounting import ModelShape

    h = 64 * layers
    ffn = 4 * h
    if ffn % granularity:
        return None
    return ModelShape(
        num_layers=layers, hidden_size=h, num_attention_heads=layers, ffn_hidden_size=ffn, vocab_size=vocab_size,
        seq_length=seq_length, num_experts=expansion_rate * granularity, moe_ffn_hidden_size=ffn // granularity,
        topk=base_topk * granularity,
    )


def accounting_optimum(law: laws.Law, flops: float, *, granularities: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                       expansion_rates: Sequence[int] = (8,), base_topk: int = 1, vocab_size: int = 32768,
                       seq_length: int = 2048, memory_bytes: float | None = None, bytes_per_param: float = 2.0,
                       max_layers: int = 160, min_tokens: float | None = None) -> Optimum:
    """Best (L, G, R) of our shape family under the budget (and the memory bound); module docstring."""
    from megatron_moe_ext.accounting import account

    _check_budget(flops)
    if memory_bytes is not None and not (math.isfinite(memory_bytes) and memory_bytes > 0):
        raise ValueError(f"--memory {memory_bytes!r} must be a number of bytes > 0; fix: e.g. --memory 80e9")
    min_tokens = float(seq_length if min_tokens is None else min_tokens)
    best: Optimum | None = None
    smallest: tuple[float, float, str] | None = None  # (flops needed, memory needed, description)
    for rate in expansion_rates:
        for gran in granularities:
            if rate * gran < base_topk * gran:
                continue
            for layers in range(1, max_layers + 1):
                shape = family_shape(layers, gran, rate, base_topk, vocab_size=vocab_size, seq_length=seq_length)
                if shape is None:
                    continue
                acc = account(shape)
                per_token = float(acc.training_flops_per_token)
                memory = float(acc.total_params) * bytes_per_param
                need = per_token * min_tokens
                if smallest is None or (need, memory) < smallest[:2]:
                    smallest = (need, memory, f"L={layers}, h={shape.hidden_size}, G={gran}, R={rate}")
                tokens = flops / per_token
                if tokens < min_tokens or (memory_bytes is not None and memory > memory_bytes):
                    continue
                active = float(acc.active_params - acc.embedding_params)
                total = float(acc.total_params - acc.embedding_params)
                n = active if law.params == "active" else total
                loss = float(law.loss(n, tokens, granularity=gran, experts=rate * gran))
                if not math.isfinite(loss):
                    continue
                if best is None or loss < best.predicted_loss:
                    notes = ()
                    if layers == max_layers:
                        notes = (f"at the family's largest shape (L={max_layers}); the optimum may lie beyond it",)
                    best = Optimum(
                        flops=flops, compute_model="accounting", granularity=gran, expansion_rate=rate,
                        experts=rate * gran, topk=base_topk * gran, num_layers=layers, hidden_size=shape.hidden_size,
                        expert_hidden_size=shape.moe_ffn_hidden_size, active_params=active, total_params=total,
                        tokens=tokens, flops_per_token=per_token, flops_used=flops, predicted_loss=loss,
                        memory_bytes=memory, embedding_params=float(acc.embedding_params), notes=notes,
                    )
    if best is None:
        need, memory, what = smallest if smallest else (math.inf, math.inf, "none")
        bound = f" and --memory {memory_bytes:g} bytes" if memory_bytes is not None else ""
        raise ValueError(
            f"no configuration fits --flops {flops:g}{bound}: the smallest ({what}) needs {need:.3g} FLOPs for "
            f"{min_tokens:g} tokens and {memory:.3g} bytes at {bytes_per_param:g} bytes/parameter; fix: raise the "
            "budget (or the memory bound), or allow smaller configurations (--granularities, --expansion-rates)")
    return best
