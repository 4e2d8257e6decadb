"""``megatron-moe-ext plan --flops C [--preset NAME | --law-json FILE] [--memory BYTES] [--json OUT]``.

The compute-optimal (N, D, G, E) for a training budget, from a named preset holding published coefficients
(``laws.PRESETS``; default ``krajewski2024``, Krajewski et al. 2024 Table 1) or from a law ``fit --json``
wrote. A preset is planned with the paper's own compute model (``optimum.paper_optimum``: Eq. 10 with its
router cost, d_model = 64 n_blocks, Brent per G), a fitted law with our accounting of a concrete Megatron
shape family (``optimum.accounting_optimum``); ``--compute-model`` overrides. ``--memory`` bounds total
parameters x ``--bytes-per-param`` and needs a joint2025 law (it varies the expert count; the Krajewski law
holds E fixed). Prints the configuration, its accounting and the predicted loss; ``--json`` writes it
atomically. Bad input, or a budget no configuration fits, exits 2 with the values and the fix.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

PROG = "megatron-moe-ext plan"


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 1,2,4,8)") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,2,4,8")
    return values


def _parser() -> argparse.ArgumentParser:
    from megatron_moe_ext.scaling.laws import PRESETS

    p = argparse.ArgumentParser(prog=PROG, description="Compute-optimal model size, tokens, granularity (and experts).")
    p.add_argument("--flops", type=float, required=True, help="training budget C in FLOPs, e.g. 1e21")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="published coefficients (default krajewski2024)")
    src.add_argument("--law-json", metavar="FILE", help="coefficients written by `megatron-moe-ext fit --json`")
    p.add_argument("--memory", type=float, metavar="BYTES", help="bound on total parameters x --bytes-per-param "
                   "(joint2025 laws only)")
    p.add_argument("--bytes-per-param", type=float, default=2.0, help="bytes per parameter for --memory (default 2)")
    p.add_argument("--granularities", type=_ints, default=None,
                   help="candidate G (default 1,2,4,...,128 for krajewski2024; 1 for joint2025, whose E counts "
                        "experts of one size: with G > 1, E = R G would grow without memory cost)")
    p.add_argument("--expansion-rates", type=_ints, default=None,
                   help="candidate expansion rates R (experts = R G); default 64 (the paper's) for krajewski2024 "
                        "laws, 1,2,4,8,16,32,64 for joint2025")
    p.add_argument("--base-topk", type=int, default=1, help="k0: top-k = k0 G (default 1)")
    p.add_argument("--compute-model", choices=("paper", "accounting"), default=None,
                   help="paper: Krajewski et al. Eq. 10 (default for presets); accounting: our FLOPs of a Megatron "
                        "shape family (default for --law-json)")
    p.add_argument("--vocab-size", type=int, default=32768, help="shape family's vocabulary (accounting; default 32768)")
    p.add_argument("--seq-length", type=int, default=2048, help="shape family's sequence length (default 2048)")
    p.add_argument("--json", metavar="OUT.json", help="write the plan as JSON")
    return p


def read_law_json(path: str):
    """A ``laws.Law`` from a coefficients file ``fit --json`` wrote; ValueError naming what is wrong."""
    from megatron_moe_ext.scaling.laws import COEFFICIENTS, Law

    try:
        with open(path) as handle:
            data = json.load(handle)
    except OSError as err:
        raise ValueError(f"--law-json {path}: {err.strerror}; fix: write it with `megatron-moe-ext fit ... --json "
                         f"{path}`") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"--law-json {path} is not JSON ({err}); fix: rewrite it with `megatron-moe-ext fit --json`") from err
    law = data.get("law") if isinstance(data, dict) else None
    if law not in COEFFICIENTS or not isinstance(data.get("coefficients"), dict):
        raise ValueError(f"--law-json {path}: needs \"law\" (one of {', '.join(COEFFICIENTS)}) and \"coefficients\"; "
                         "fix: write it with `megatron-moe-ext fit ... --json`")
    coefficients = {}
    for key in COEFFICIENTS[law]:
        value = data["coefficients"].get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"--law-json {path}: coefficient {key}={value!r} is missing or not a finite number; "
                             "fix: refit with `megatron-moe-ext fit ... --json`")
        coefficients[key] = float(value)
    return Law(law, coefficients, params=data.get("params", "active"), source=str(data.get("source", path)))


def format_plan(opt, law) -> str:
    from megatron_moe_ext.scaling.laws import KRAJEWSKI_C_F, KRAJEWSKI_C_R

    which = "total" if law.params == "total" else "active"
    lines = [
        f"compute-optimal plan for C = {opt.flops:.4g} FLOPs ({law.law}; {law.source})",
        f"  granularity G          {opt.granularity}",
        f"  experts E              {opt.experts}  (expansion rate {opt.expansion_rate} x G), top-k {opt.topk}",
        f"  layers / hidden        {opt.num_layers:.4g} / {opt.hidden_size:.5g}  (expert hidden size "
        f"{opt.expert_hidden_size:.5g})",
        f"  active params N_act    {opt.active_params:.4g}  (non-embedding)",
        f"  total params           {opt.total_params:.4g}  (non-embedding; the law takes the {which} count)",
        f"  tokens D               {opt.tokens:.4g}",
        f"  FLOPs per token        {opt.flops_per_token:.4g}  (training; D x this = {opt.flops_used:.4g})",
        f"  predicted loss         {opt.predicted_loss:.4f}",
    ]
    if opt.compute_model == "krajewski2024-eq10":
        lines.append(f"  accounting: Krajewski et al. 2024 Eq. 10, (12 d^2 c_f + d E G c_r) D n_blocks, c_f = "
                     f"{KRAJEWSKI_C_F:g}, c_r = {KRAJEWSKI_C_R:g}, d = 64 n_blocks")
    else:
        lines.append("  accounting: megatron_moe_ext.accounting (3 x forward matmul FLOPs incl. attention, router, "
                     f"logits); embeddings {opt.embedding_params:.4g} params")
        if opt.memory_bytes is not None:
            lines.append(f"  memory                 {opt.memory_bytes:.4g} bytes (all parameters)")
    lines += [f"  note: {n}" for n in opt.notes]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    ns = parser.parse_args(list(argv))
    try:
        return _run(ns)
    except ValueError as err:
        parser.error(str(err))
    return 2  # unreachable: parser.error exits


def _run(ns: argparse.Namespace) -> int:
    from megatron_moe_ext.scaling import optimum
    from megatron_moe_ext.scaling.atomic_files import write_json_atomic
    from megatron_moe_ext.scaling.laws import PRESETS

    law = read_law_json(ns.law_json) if ns.law_json else PRESETS[ns.preset or "krajewski2024"]
    if not (math.isfinite(ns.flops) and ns.flops > 0):
        raise ValueError(f"--flops {ns.flops} must be a finite number > 0; fix: e.g. --flops 1e21")
    if ns.base_topk < 1:
        raise ValueError(f"--base-topk {ns.base_topk} must be >= 1")
    model = ns.compute_model or ("accounting" if ns.law_json else "paper")
    if ns.memory is not None and law.law != "joint2025":
        raise ValueError(f"--memory {ns.memory:g} needs a law that varies the number of experts; {law.law} holds the "
                         "expansion rate fixed; fix: fit a joint2025 law (`megatron-moe-ext fit ... --law joint2025 "
                         "--json law.json`) and pass --law-json law.json, or drop --memory")
    rates = ns.expansion_rates or ((64,) if law.law == "krajewski2024" else (1, 2, 4, 8, 16, 32, 64))
    grans = ns.granularities or ((1, 2, 4, 8, 16, 32, 64, 128) if law.law == "krajewski2024" else (1,))
    if model == "paper":
        if len(rates) != 1:
            raise ValueError(f"--expansion-rates {','.join(map(str, rates))}: the paper's compute model holds one "
                             "expansion rate; fix: give one (e.g. 64) or use --compute-model accounting")
        opt = optimum.paper_optimum(law, ns.flops, granularities=grans, expansion_rate=rates[0],
                                    base_topk=ns.base_topk)
    else:
        opt = optimum.accounting_optimum(law, ns.flops, granularities=grans, expansion_rates=rates,
                                         base_topk=ns.base_topk, vocab_size=ns.vocab_size, seq_length=ns.seq_length,
                                         memory_bytes=ns.memory, bytes_per_param=ns.bytes_per_param)
    print(format_plan(opt, law))
    if ns.json:
        write_json_atomic(ns.json, {"law": law.law, "coefficients": law.coefficients, "params": law.params,
                                    "source": law.source, "memory_bound_bytes": ns.memory, **opt.to_dict()})
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
