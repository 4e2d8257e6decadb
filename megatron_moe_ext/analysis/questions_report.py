"""The five research questions of the interpretability lab, one report section each, from the models' summaries:
``compare --sweep DIR`` puts the MoE runs of a scaling sweep next to their dense baselines of equal compute and of
equal total parameters, and this module reads what bears on each question out of their ``summary.json`` entries
(routing statistics, CKA, interventions, readouts, MoEfication):

1. Can techniques for understanding dense networks be applied to MoE models?  (which readouts ran or do not
   apply; probe accuracy against the shuffled-label control)
2. Do MoEs behave like very wide dense models?  (CKA against the equal-parameter dense model; MoEfication's share
   of a dense FFN's output its top-k clusters carry next to the share of the all-experts output the MoE's routed
   top-k carry)
3. How does granularity change representations?  (by number of experts: label specialisation, load entropy, CKA
   against the equal-compute dense model)
4. What role do the many routing paths play?  (path diversity; loss with routing frozen to the P most frequent
   paths, random routing, routing copied from another layer)
5. When do fine-grained MoEs win?  (clean next-token loss per configuration against both dense baselines)

Uncertainty is printed where the measurement has one: bootstrap intervals over windows (MoEfication), standard
errors over windows (interventions), the shuffled-label control (probes), the plug-in MI bias, and the spread
over seeds when a configuration was trained with several (runs named ``..._s<seed>``). Each section ends with a
one-line reading that restates the numbers only.

Pure: dicts in, Markdown out (plus :func:`sweep_models`, which reads a sweep directory's ``runs.json``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

ROLES: tuple[str, ...] = ("moe", "dense_equal_compute", "dense_equal_params")  # scaling/sweep_plan.py KINDS
_SEED = re.compile(r"_s\d+$")
_TRACKER = "latest_checkpointed_iteration.txt"
QUESTIONS: tuple[str, ...] = (
    "Can techniques for understanding dense networks be applied to MoE models?",
    "Do MoEs behave like very wide dense models?",
    "How does granularity change representations?",
    "What role do the many routing paths play?",
    "When do fine-grained MoEs win?",
)


def sweep_models(sweep_dir: str, *, allow_unfinished: bool = False) -> list[tuple[str, str, str]]:
    """(name, checkpoint directory, role) per run of a ``sweep plan`` / ``sweep run`` directory (its
    ``runs.json``; each run's checkpoint is ``DIR/RUN/ckpt``), in the plan's order. ValueError naming the fix for
    a directory that is not a plan, runs without a checkpoint (unless ``allow_unfinished``: then left out), or
    fewer than two finished runs with at least one MoE run."""
    path = os.path.join(sweep_dir, "runs.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: {sweep_dir!r} is not a sweep directory; fix: `megatron-moe-ext "
                         f"sweep plan ... --out {sweep_dir}` then `megatron-moe-ext sweep run {sweep_dir}`")
    with open(path) as f:
        rows = json.load(f)["runs"]
    out, unfinished = [], []
    for row in rows:
        if row["kind"] not in ROLES:
            raise ValueError(f"{path}: run {row['run']!r} has kind {row['kind']!r}, expected one of {ROLES}")
        ckpt = os.path.join(sweep_dir, row["run"], "ckpt")
        if not os.path.isfile(os.path.join(ckpt, _TRACKER)):
            unfinished.append(row["run"])
            continue
        out.append((row["run"], ckpt, row["kind"]))
    if unfinished and not allow_unfinished:
        raise ValueError(f"runs {unfinished} of {sweep_dir} have no checkpoint yet; fix: finish them with "
                         f"`megatron-moe-ext sweep run {sweep_dir}`")
    if len(out) < 2 or not any(role == "moe" for _, _, role in out):
        raise ValueError(f"{sweep_dir} has {len(out)} finished runs ({sum(r == 'moe' for *_, r in out)} MoE); a "
                         f"comparison needs two or more with at least one MoE run; fix: `megatron-moe-ext sweep run "
                         f"{sweep_dir}`")
    return out


# -- reading the summaries ---------------------------------------------------------------------------------------
def _num(x: Any) -> str:
    from megatron_moe_ext.analysis.summary import fmt

    return fmt(x) if x is None or isinstance(x, (int, float)) else str(x)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mean(xs: Sequence[Any]) -> float | None:
    v = [float(x) for x in xs if _finite(x)]
    return sum(v) / len(v) if v else None


def _ci(stat: Mapping[str, Any] | None) -> tuple[float | None, str]:
    """(mean, "95% CI [lo, hi]") of a MoEfication statistic."""
    if not stat or not _finite(stat.get("mean")):
        return None, ""
    lo, hi = stat.get("ci95", [None, None])
    return stat["mean"], f"95% bootstrap CI [{_num(lo)}, {_num(hi)}]"


def clean_loss(model: Mapping[str, Any]) -> tuple[float | None, str]:
    """A model's clean next-token loss on the analysed tokens and its uncertainty: MoEfication's (its measured
    windows, bootstrap CI) when it ran, else an intervention's clean baseline (all tokens, no interval)."""
    m = model.get("moefication")
    if isinstance(m, dict) and "clean_loss" in m:
        return _ci(m["clean_loss"])
    for name in ("expert_ablation", "topk_change", "random_routing", "frozen_paths", "layer_copy"):
        r = model.get(name)
        if isinstance(r, dict) and isinstance(r.get("clean"), dict) and _finite(r["clean"].get("loss")):
            return r["clean"]["loss"], f"{r['clean']['tokens']} tokens, no interval"
    return None, ""


def _cka_mean(cka: Sequence[Mapping[str, Any]], a: str, b: str) -> tuple[float | None, int]:
    """Mean over layer index i of CKA(layer i of a, layer i of b) and the number of layers averaged."""
    for c in cka:
        if {c["model_a"], c["model_b"]} == {a, b} and a != b:
            m = c["matrix"]
            diag = [m[i][i] for i in range(min(len(m), len(m[0]) if m else 0))]
            return _mean(diag), len(diag)
    return None, 0


def _routed_layers(model: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [l for l in model["layers"] if l["num_experts"] > 1]


def _config(name: str) -> str:
    return _SEED.sub("", name)


def _seed_spread(values: Sequence[float | None]) -> str:
    v = [x for x in values if _finite(x)]
    if len(v) < 2:
        return "1 seed"
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return f"{len(v)} seeds, sd {_num(sd)}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    if not rows:
        return ["(nothing measured)", ""]
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(_num(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows] + [""])


# -- the five sections -------------------------------------------------------------------------------------------
_READOUTS = ("logit_lens", "probes", "coactivation", "moefication", "expert_ablation", "topk_change",
             "random_routing", "frozen_paths", "layer_copy")


def _q1(models: Mapping[str, Any], roles: Mapping[str, str]) -> list[str]:
    rows, sel = [], {"moe": [], "dense": []}
    for n, m in models.items():
        for r in _READOUTS:
            if r not in m:
                continue
            res = m[r]
            status = (f"not applicable: {res['not_applicable']}" if isinstance(res, dict) and "not_applicable" in res
                      else "ran")
            value, unc = "", ""
            if r == "probes" and status == "ran":
                best = [(p["accuracy"], p["control_accuracy"]) for l in res.get("layers", [])
                        for k, p in l.get("probes", {}).items() if k == "hidden/labels" and "accuracy" in p]
                if best:
                    acc, ctrl = max(best, key=lambda t: t[0] - t[1])
                    value, unc = acc, f"shuffled-label control {_num(ctrl)}"
                    sel["moe" if roles.get(n) == "moe" else "dense"].append(acc - ctrl)
            rows.append([n, roles.get(n, "?"), r, status, value, unc])
    applied = {r for n, m in models.items() if roles.get(n) == "moe" for r in _READOUTS
               if r in m and not (isinstance(m[r], dict) and "not_applicable" in m[r])}
    md = _table(["model", "role", "readout / intervention", "status", "best label-probe accuracy (hidden)",
                 "uncertainty"], rows)
    reading = (f"Reading: {len(applied)} readouts/interventions gave results on the MoE models"
               + (f"; label-probe selectivity (accuracy - control), best layer: MoE mean {_num(_mean(sel['moe']))}"
                  f", dense mean {_num(_mean(sel['dense']))}." if sel["moe"] or sel["dense"] else "."))
    return md + [reading, ""]


def _q2(models: Mapping[str, Any], roles: Mapping[str, str], cka: Sequence[Mapping[str, Any]]) -> list[str]:
    moe = [n for n in models if roles.get(n) == "moe"]
    wide = [n for n in models if roles.get(n) == "dense_equal_params"]
    compute = [n for n in models if roles.get(n) == "dense_equal_compute"]
    rows = []
    for a in moe:
        for b in wide + compute:
            v, L = _cka_mean(cka, a, b)
            if v is not None:
                rows.append([a, b, roles[b], "linear CKA, mean over layers", v, f"{L} layers, one pass"])
    shares_moe, shares_dense = [], []
    for n in models:
        mo = models[n].get("moefication")
        if not isinstance(mo, dict) or "not_applicable" in mo:
            continue
        for l, d in (mo.get("dense") or {}).get("layers", {}).items():
            v, unc = _ci(d["share_topk"])
            shares_dense.append(v)
            rows.append([n, f"dense layer {l}", roles.get(n, "?"),
                         f"output share of the top-{mo['topk']} of {mo['clusters']} neuron clusters", v, unc])
        for l, d in (mo.get("moe") or {}).get("layers", {}).items():
            v, unc = _ci(d["share_routed"])
            shares_moe.append(v)
            rows.append([n, f"MoE layer {l}", roles.get(n, "?"),
                         f"all-experts output share of the routed top-{d['top_k']} of {d['num_experts']}", v, unc])
    wide_cka = _mean([r[4] for r in rows if r[2] == "dense_equal_params" and "CKA" in r[3]])
    md = _table(["model", "against / layer", "role", "measurement", "value", "uncertainty"], rows)
    return md + [f"Reading: mean CKA of the MoE models with the equal-parameter dense model {_num(wide_cka)}; mean "
                 f"output share of the top-k dense-FFN clusters {_num(_mean(shares_dense))}, of the MoE's routed "
                 f"top-k {_num(_mean(shares_moe))}.", ""]


def _q3(models: Mapping[str, Any], roles: Mapping[str, str], cka: Sequence[Mapping[str, Any]]) -> list[str]:
    compute = [n for n in models if roles.get(n) == "dense_equal_compute"]
    by_config: dict[str, list[str]] = {}
    for n in models:
        if roles.get(n) == "moe" and _routed_layers(models[n]):
            by_config.setdefault(_config(n), []).append(n)
    rows = []
    for cfg, names in by_config.items():
        first = _routed_layers(models[names[0]])[0]
        mi = [_mean([(l["specialisation"].get("label") or {}).get("corrected_nats") for l in _routed_layers(models[n])])
              for n in names]
        ent = [_mean([l["entropy_normalized"] for l in _routed_layers(models[n])]) for n in names]
        ck = [_cka_mean(cka, n, compute[0])[0] if compute else None for n in names]
        rows.append([cfg, first["num_experts"], first["top_k"], _mean(mi), _mean(ent), _mean(ck),
                     f"{_seed_spread(mi)} (label MI); MI bias-corrected"])
    rows.sort(key=lambda r: (r[1], r[2]))
    md = _table(["configuration", "experts N", "top-k", "label MI corrected (nats, mean over layers)",
                 "load entropy / log N", "CKA with equal-compute dense", "uncertainty"], rows)
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        reading = (f"Reading: from N = {lo[1]} to N = {hi[1]} experts, label MI {_num(lo[3])} -> {_num(hi[3])} nats, "
                   f"CKA with the equal-compute dense model {_num(lo[5])} -> {_num(hi[5])}.")
    else:
        reading = "Reading: one MoE configuration; granularity cannot be compared."
    return md + [reading, ""]


def _q4(models: Mapping[str, Any], roles: Mapping[str, str]) -> list[str]:
    rows = []
    for n, m in models.items():
        if roles.get(n) != "moe":
            continue
        if m.get("path_diversity"):
            p = m["path_diversity"][0]
            rows.append([n, "distinct top-1 paths / min(tokens, possible)", p["of_max"],
                         f"{p['distinct']} paths over {p['num_tokens']} tokens"])
        for name in ("frozen_paths", "random_routing", "layer_copy"):
            r = m.get(name)
            if not isinstance(r, dict) or "not_applicable" in r:
                continue
            for v in r.get("variants", []):
                rows.append([n, f"{name} {v['name']}: loss change", v["delta"], f"se {_num(v['delta_se'])} (windows)"])
    deltas = {name: _mean([r[2] for r in rows if r[1].startswith(name)]) for name in
              ("frozen_paths", "random_routing", "layer_copy")}
    md = _table(["model", "measurement", "value", "uncertainty"], rows)
    return md + ["Reading: mean loss change with routing frozen to the most frequent paths "
                 f"{_num(deltas['frozen_paths'])}, with random routing at the same load "
                 f"{_num(deltas['random_routing'])}, with routing copied from another layer "
                 f"{_num(deltas['layer_copy'])} (nats/token).", ""]


def _q5(models: Mapping[str, Any], roles: Mapping[str, str]) -> list[str]:
    groups: dict[tuple[str, str], list[tuple[str, float | None, str]]] = {}
    for n, m in models.items():
        loss, unc = clean_loss(m)
        groups.setdefault((roles.get(n, "?"), _config(n)), []).append((n, loss, unc))
    rows = []
    for (role, cfg), items in groups.items():
        routed = _routed_layers(models[items[0][0]])
        losses = [l for _, l, _ in items]
        unc = items[0][2] if len(items) == 1 else _seed_spread(losses)
        rows.append([cfg, role, routed[0]["num_experts"] if routed else "dense", _mean(losses), unc])
    rows.sort(key=lambda r: (r[1] != "moe", r[0]))
    md = _table(["configuration", "role", "experts N", "clean next-token loss (nats)", "uncertainty"], rows)
    have = [r for r in rows if r[3] is not None]
    if not have:
        return md + ["Reading: no clean loss was measured (run compare with --readouts moefication or an "
                     "intervention).", ""]
    best = min(have, key=lambda r: r[3])
    dense = {r[1]: r[3] for r in have if r[1] != "moe"}
    return md + [f"Reading: lowest loss {_num(best[3])} ({best[0]}, {best[1]}); equal-compute dense "
                 f"{_num(dense.get('dense_equal_compute'))}, equal-parameter dense "
                 f"{_num(dense.get('dense_equal_params'))}.", ""]


def questions_section(summaries: Mapping[str, Mapping[str, Any]], roles: Mapping[str, str], *,
                      cka: Sequence[Mapping[str, Any]] = ()) -> str:
    """The Markdown of the five questions: ``summaries`` are the models' summary.json entries (name -> dict),
    ``roles`` name -> one of :data:`ROLES`, ``cka`` the summary.json "cka" list. ValueError for a role outside
    ROLES or a name not among the summaries."""
    bad = {n: r for n, r in roles.items() if r not in ROLES}
    if bad:
        raise ValueError(f"roles {bad}: expected one of {ROLES}; fix: the roles sweep_models returns")
    missing = sorted(set(roles) - set(summaries))
    if missing:
        raise ValueError(f"roles name models {missing} that are not in the comparison ({sorted(summaries)})")
    md = ["# The five questions", "",
          "Each section lists the measurements of this comparison that bear on the question and restates them in "
          "one line; roles: " + ", ".join(f"`{n}` {roles.get(n, 'unassigned')}" for n in summaries) + ".", ""]
    bodies = (_q1(summaries, roles), _q2(summaries, roles, cka), _q3(summaries, roles, cka), _q4(summaries, roles),
              _q5(summaries, roles))
    for i, (q, body) in enumerate(zip(QUESTIONS, bodies), 1):
        md += [f"## Q{i}. {q}", "", *body]
    return "\n".join(md)


__all__ = ["QUESTIONS", "ROLES", "clean_loss", "questions_section", "sweep_models"]
