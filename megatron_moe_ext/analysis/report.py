"""Routing-analysis report: a directory with ``report.md`` (Markdown tables and figure links), ``summary.json``
(every number, the very values the tables print) and ``figures/*.png``, for one model (analyze) or several side
by side (compare).

The tables are rendered from the JSON document itself, so report and JSON cannot disagree: a table cell is the
JSON value printed with 6 significant digits (``n/a`` for null: an undefined statistic, e.g. NaN entropy of an
empty layer).

The report appears all at once or not at all: it is built in a temporary sibling directory of ``out_dir`` (same
parent, so the final rename stays on one file system) that is renamed to ``out_dir`` at the end and removed on
any failure. An existing ``out_dir`` is refused, never overwritten.

Legend: La / Lb layers with hidden states of models a / b, M models.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from megatron_moe_ext.analysis import plots
from megatron_moe_ext.analysis.summary import (
    DEFAULT_POSITION_BUCKETS,
    CKAResult,
    Summary,
    TraceMismatchError,
    cka_compatible,
    fmt,
    self_cka,
    summarize_trace,
    trace_cka,
)

REPORT_FORMAT = "megatron_moe_ext.routing_report"
REPORT_VERSION = 1
REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"
FIGURES_DIR = "figures"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _check_out_dir(out_dir: str | os.PathLike[str]) -> str:
    out = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out):
        raise ValueError(f"out_dir={out!r} already exists; a report never overwrites one: fix: choose a new "
                         f"directory or delete the old one")
    return out


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _cka_entries(cka: Mapping[tuple[str, str], CKAResult | Any] | None,
                 summaries: Mapping[str, Summary]) -> list[tuple[str, str, CKAResult]]:
    out = []
    for key, value in (cka or {}).items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(k in summaries for k in key)):
            raise ValueError(f"cka key {key!r}: expected a (name_a, name_b) pair of model names from "
                             f"{sorted(summaries)}")
        a, b = key
        if not isinstance(value, CKAResult):
            m = np.asarray(value, dtype=np.float64)
            if m.ndim != 2:
                raise ValueError(f"cka[{key!r}] of shape {m.shape}: expected a [layers_a, layers_b] matrix or a "
                                 f"CKAResult")
            ha, hb = summaries[a].hidden_layers, summaries[b].hidden_layers
            # A bare matrix is labelled with the models' hidden-state layers when the shape fits, else by index.
            la = ha if len(ha) == m.shape[0] else list(range(m.shape[0]))
            lb = hb if len(hb) == m.shape[1] else list(range(m.shape[1]))
            value = CKAResult(la, lb, m, min(summaries[a].num_tokens, summaries[b].num_tokens), False)
        out.append((a, b, value))
    return out


def _document(summaries: Mapping[str, Summary], cka: list[tuple[str, str, CKAResult]], title: str,
              cka_skipped: list[dict[str, str]], figures: dict[str, Any]) -> dict[str, Any]:
    return {"format": REPORT_FORMAT, "version": REPORT_VERSION, "title": title,
            "mode": "analyze" if len(summaries) == 1 else "compare",
            "models": {name: s.to_json() for name, s in summaries.items()},
            "cka": [{"model_a": a, "model_b": b, **r.to_json()} for a, b, r in cka],
            "cka_skipped": cka_skipped, "figures": figures}


def _markdown(doc: dict[str, Any]) -> str:
    models: dict[str, Any] = doc["models"]
    figs = doc["figures"]
    compare = doc["mode"] == "compare"
    md = [f"# {doc['title']}", "",
          (f"Mode: **{doc['mode']}** ({len(models)} model{'s' if compare else ''}: "
           f"{', '.join(f'`{n}`' for n in models)}). Every number is in `{SUMMARY_FILE}`; tables print it with 6 "
           f"significant digits, `n/a` = undefined."), "", "## Models", ""]
    md += _table(["model", "trace", "tokens", "traced layers", "labels", "MI mode", "position buckets"],
                 [[n, f"`{m['trace_dir']}`", m["num_tokens"], ", ".join(str(l["layer"]) for l in m["layers"]),
                   m["has_labels"], m["mode"], m["position_buckets"]] for n, m in models.items()])

    md += ["## Load balance", "",
           ("MaxVio = max load / mean load - 1 (0 = balanced); dead = experts never selected; entropy of the load "
            "distribution in nats and divided by log N (1 = uniform)."), ""]
    rows = [[n, l["layer"], l["num_experts"], l["top_k"], l["num_heads"], l["tokens"], l["max_violation"],
             l["dead_count"], l["dead_fraction"], l["entropy_nats"], l["entropy_normalized"]]
            for n, m in models.items() for l in m["layers"]]
    rows.sort(key=lambda r: (r[1], list(models).index(r[0])))  # same layer of every model together
    md += _table(["model", "layer", "experts", "top-k", "heads", "tokens", "MaxVio", "dead", "dead fraction",
                  "entropy (nats)", "entropy / log N"], rows)
    md += [f"![load balance]({figs['load_balance']})", ""]
    for n in models:
        md += [f"![expert load {n}]({figs['expert_load'][n]})", ""]

    if compare:
        md += ["### Side by side", ""]
        layers = sorted({l["layer"] for m in models.values() for l in m["layers"]})
        side = []
        for layer in layers:
            for label, get in (("MaxVio", lambda l: l["max_violation"]),
                               ("dead fraction", lambda l: l["dead_fraction"]),
                               ("entropy / log N", lambda l: l["entropy_normalized"]),
                               ("label MI corrected", lambda l: (l["specialisation"].get("label") or {})
                                .get("corrected_nats"))):
                row: list[Any] = [layer, label]
                for m in models.values():
                    by = {l["layer"]: l for l in m["layers"]}
                    row.append(get(by[layer]) if layer in by else None)
                side.append(row)
        md += _table(["layer", "statistic", *models], side)

    md += ["## Specialisation", "",
           ("Plug-in mutual information (nats) between each token's top-1 expert and its token id, position bucket "
            "or label; bias = (Kx-1)(Ky-1)/(2S) expected under independence, corrected = MI - bias; H = entropy of "
            "the variable (corrected / H = share of its information the routing carries)."), ""]
    rows = []
    for n, m in models.items():
        for l in m["layers"]:
            for var, mi in l["specialisation"].items():
                share = (None if mi["corrected_nats"] is None or not mi["entropy_y"]
                         else mi["corrected_nats"] / mi["entropy_y"])
                rows.append([n, l["layer"], var, mi["nats"], mi["bias_nats"], mi["corrected_nats"], mi["entropy_y"],
                             share])
    md += _table(["model", "layer", "variable", "MI (nats)", "bias", "corrected", "H(variable)", "corrected / H"],
                 rows)
    for n, by_layer in figs["specialisation"].items():
        for layer, path in by_layer.items():
            md += [f"![specialisation {n} layer {layer}]({path})", ""]

    md += ["## Layer-to-layer routing dependence", "",
           ("MI (nats) between consecutive traced layers' routing of the same token (identical routing: MI = "
            "H(top-1 load); independent: MI ~ bias)."), ""]
    md += _table(["model", "layers", "MI (nats)", "bias", "corrected", "H(layer a)", "H(layer b)"],
                 [[n, f"{d['layer_a']} -> {d['layer_b']}", d["nats"], d["bias_nats"], d["corrected_nats"],
                   d["entropy_x"], d["entropy_y"]] for n, m in models.items() for d in m["dependence"]]
                 or [["(one traced layer)", "", None, None, None, None, None]])

    md += ["## Path diversity", "",
           "Distinct top-1 expert paths over the layers; normalised = distinct / min(tokens, possible paths).", ""]
    md += _table(["model", "layers", "distinct", "tokens", "per token", "normalised"],
                 [[n, "-".join(map(str, p["layers"])), p["distinct"], p["num_tokens"], p["per_token"], p["of_max"]]
                  for n, m in models.items() for p in m["path_diversity"]])
    md += [f"![path diversity]({figs['path_diversity']})", ""]

    multi = [[n, l["layer"], l["num_heads"], l["top_k"], l["head_overlap"],
              (l["effective_experts"] or {}).get("entropy"), (l["effective_experts"] or {}).get("inverse_simpson"),
              (l["effective_experts"] or {}).get("skipped") or ""]
             for n, m in models.items() for l in m["layers"] if l["num_heads"] > 1 or l["top_k"] > 1]
    if multi:
        md += ["## Product-key heads and effective experts", "",
               ("Head overlap = mean Jaccard overlap of the expert sets of two heads (1 = redundant heads); "
                "effective experts = mean over tokens of exp(gate entropy) and 1 / sum p^2 of the normalised gates."),
               ""]
        md += _table(["model", "layer", "heads", "top-k", "head overlap", "effective (entropy)",
                      "effective (inverse Simpson)", "note"], multi)

    if doc["cka"] or doc["cka_skipped"]:
        md += ["## Representation similarity (linear CKA)", ""]
        for c in doc["cka"]:
            what = "self-similarity" if c["model_a"] == c["model_b"] else "cross-model"
            debiased = ", debiased" if c["debiased"] else ""
            md += [f"### `{c['model_a']}` vs `{c['model_b']}` ({what}, {c['num_tokens']} tokens{debiased})", ""]
            md += _table([f"{c['model_a']} \\ {c['model_b']}", *[f"layer {l}" for l in c["layers_b"]]],
                         [[f"layer {la}", *row] for la, row in zip(c["layers_a"], c["matrix"])])
            md += [f"![cka {c['model_a']} vs {c['model_b']}]({c['figure']})", ""]
        for s in doc["cka_skipped"]:
            md += [f"- CKA `{s['model_a']}` vs `{s['model_b']}` skipped: {s['reason']}"]
        md += [""]
    return "\n".join(md)


def _section_module(name: str) -> Any | None:
    """The module that renders instrument ``name`` (``instrument_api``'s registries), or None if unknown."""
    import importlib

    from megatron_moe_ext.analysis.instrument_api import INSTRUMENTS, TRACE_READOUTS

    entry = INSTRUMENTS.get(name) or TRACE_READOUTS.get(name)
    return None if entry is None else importlib.import_module(entry.split(":")[0])


def _demote(text: str, levels: int) -> str:
    """Markdown headings moved ``levels`` levels down (a section nested under a model's heading)."""
    return "\n".join("#" * levels + line if line.startswith("#") else line for line in text.split("\n"))


def _instrument_markdown(doc: dict[str, Any], tmp: str) -> str:
    """One section per instrument any model ran (in the registries' order, unknown names last). Analyze: the
    instrument module's ``report_section(result, figures_dir)`` (under ``## NAME`` when it has no heading of its
    own, else its first heading followed by `` (`NAME`)``); compare: ``## NAME`` with a ``### model`` part per
    model, the module's headings two levels down.
    Figures go to a directory of their own per (instrument, model), ``figures/NAME-i-MODEL/``, and the section's
    ``figures/X`` links are pointed there. A ``{"not_applicable": reason}`` result prints the reason."""
    from megatron_moe_ext.analysis.instrument_api import INSTRUMENTS, TRACE_READOUTS

    models: dict[str, Any] = doc["models"]
    compare = doc["mode"] == "compare"
    order = [*INSTRUMENTS, *TRACE_READOUTS]
    names = sorted({n for m in models.values() for n in m.get("instruments", [])},
                   key=lambda n: (order.index(n) if n in order else len(order), n))
    md: list[str] = []
    for name in names:
        module = _section_module(name)
        if compare:
            md += [f"## {name}", ""]
        for i, (model, m) in enumerate(models.items()):
            if name not in m:
                continue
            result = m[name]
            if isinstance(result, dict) and "not_applicable" in result:
                text = f"Not applicable: {result['not_applicable']}"
            elif module is None or not hasattr(module, "report_section"):
                text = f"(no renderer for `{name}`; the result is in `{SUMMARY_FILE}`)"
            else:
                sub = f"{_slug(name)}-{i}-{_slug(model)}"
                fig_dir = os.path.join(tmp, FIGURES_DIR, sub)
                os.mkdir(fig_dir)
                text = module.report_section(result, fig_dir)
                for f in sorted(os.listdir(fig_dir), key=len, reverse=True):
                    text = text.replace(f"]({FIGURES_DIR}/{f})", f"]({FIGURES_DIR}/{sub}/{f})")
                if not os.listdir(fig_dir):
                    os.rmdir(fig_dir)
            text = text.strip("\n")
            if compare:
                md += [f"### `{model}`", "", _demote(text, 2), ""]
            else:
                if text.startswith("#"):  # the module's own heading, with the name the flags use
                    first, _, rest = text.partition("\n")
                    text = f"{first} (`{name}`)" + ("\n" + rest if rest else "")
                    md += [text, ""]
                else:
                    md += [f"## {name}", "", text, ""]
    return "\n".join(md)


def write_report(summaries: Mapping[str, Summary], out_dir: str | os.PathLike[str],
                 cka: Mapping[tuple[str, str], CKAResult | Any] | None = None, title: str = "Routing analysis",
                 *, cka_skipped: Mapping[tuple[str, str], str] | None = None,
                 roles: Mapping[str, str] | None = None) -> str:
    """Writes ``out_dir``/report.md, summary.json and figures/*.png for the models in ``summaries`` (one: analyze,
    several: compare, in the mapping's order). ``cka`` maps (name_a, name_b) to a :class:`CKAResult` (or a bare
    [La, Lb] matrix); (name, name) is a self-similarity. ``cka_skipped`` maps pairs to why no CKA was computed.
    Refuses an existing ``out_dir``; built in a temporary sibling and renamed at the end, so a failure leaves
    nothing behind. Each model's instrument results (``Summary.instruments``) go into summary.json under their
    names and get a section each. ``roles`` (model name -> "moe", "dense_equal_compute", "dense_equal_params":
    a sweep, :func:`questions_report.sweep_models`) adds the five research questions' section
    (:func:`questions_report.questions_section`). Returns the path of report.md."""
    if not summaries:
        raise ValueError("summaries is empty: a report needs at least one model; fix: {name: summarize_trace(dir)}")
    for name, s in summaries.items():
        if not isinstance(name, str) or not name or not isinstance(s, Summary):
            raise ValueError(f"summaries[{name!r}]: expected a non-empty str name mapping to a Summary")
    out = _check_out_dir(out_dir)
    entries = _cka_entries(cka, summaries)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename; os.mkdir honours the umask.
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        os.mkdir(os.path.join(tmp, FIGURES_DIR))
        slugs = {n: f"{i}-{_slug(n)}" for i, n in enumerate(summaries)}  # index keeps slugs unique

        def fig(name: str) -> tuple[str, str]:
            rel = f"{FIGURES_DIR}/{name}.png"
            return rel, os.path.join(tmp, rel)

        figures: dict[str, Any] = {"expert_load": {}, "specialisation": {}}
        rel, full = fig("load_balance")
        plots.plot_load_balance(summaries, full)
        figures["load_balance"] = rel
        rel, full = fig("path_diversity")
        plots.plot_path_diversity(summaries, full)
        figures["path_diversity"] = rel
        for n, s in summaries.items():
            rel, full = fig(f"expert_load-{slugs[n]}")
            plots.plot_expert_load(s, full, title=f"{n}: expert load relative to the layer mean")
            figures["expert_load"][n] = rel
            for layer in s.layers:
                if layer.label_matrix is not None:
                    rel, full = fig(f"specialisation-{slugs[n]}-layer{layer.layer}")
                    plots.plot_specialisation(layer, full, title=f"{n} layer {layer.layer}: label share per expert",
                                              label_names=s.label_names)
                    figures["specialisation"].setdefault(n, {})[str(layer.layer)] = rel
        cka_figs = []
        for a, b, r in entries:
            rel, full = fig(f"cka-{slugs[a]}-vs-{slugs[b]}")
            plots.plot_cka(r, full, name_a=a, name_b=b)
            cka_figs.append(rel)
        skipped = [{"model_a": a, "model_b": b, "reason": why} for (a, b), why in (cka_skipped or {}).items()]
        doc = _document(summaries, entries, title, skipped, figures)
        for c, rel in zip(doc["cka"], cka_figs):
            c["figure"] = rel
        text = _markdown(doc)
        sections = _instrument_markdown(doc, tmp)
        if roles is not None:
            from megatron_moe_ext.analysis.questions_report import questions_section

            doc["roles"] = dict(roles)
            sections += "\n" + questions_section(doc["models"], dict(roles), cka=doc["cka"])
        with open(os.path.join(tmp, SUMMARY_FILE), "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
        with open(os.path.join(tmp, REPORT_FILE), "w") as f:
            f.write(text + ("\n" + sections if sections.strip() else ""))
        # Checked again: the directory may have appeared while the report was built.
        _check_out_dir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out, REPORT_FILE)


def analyze_traces(trace_dirs: Mapping[str, str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
                   cka: bool = True, progress: bool = False, title: str | None = None,
                   position_buckets: int = DEFAULT_POSITION_BUCKETS, mode: str = "top1",
                   debiased: bool = False, display_dirs: Mapping[str, str] | None = None,
                   roles: Mapping[str, str] | None = None) -> str:
    """Summarises every trace (name -> trace directory), computes linear CKA between every pair of traces whose
    hidden states cover the same tokens (pairs that do not are listed as skipped with the reason) and each
    trace's own layers against each other (when it recorded >= 2), and writes the report (:func:`write_report`).
    ``display_dirs`` (name -> path) is what the report shows as each trace's location, for callers that move the
    traces after the report is written. ``roles`` as :func:`write_report`. Returns the path of report.md."""
    if not trace_dirs:
        raise ValueError("trace_dirs is empty; fix: {name: trace_dir} for one (analyze) or more (compare) models")
    _check_out_dir(out_dir)  # fail before the (long) passes over the traces
    summaries = {name: summarize_trace(path, position_buckets=position_buckets, mode=mode, progress=progress)
                 for name, path in trace_dirs.items()}
    if display_dirs:
        summaries = {n: dataclasses.replace(s, trace_dir=display_dirs.get(n, s.trace_dir)) for n, s in summaries.items()}
    results: dict[tuple[str, str], CKAResult] = {}
    skipped: dict[tuple[str, str], str] = {}
    if cka:
        for name, s in summaries.items():
            if len(s.hidden_layers) >= 2:
                results[(name, name)] = self_cka(trace_dirs[name], debiased=debiased, progress=progress)
        for a, b in itertools.combinations(summaries, 2):
            why = cka_compatible(trace_dirs[a], trace_dirs[b])
            if why is None:
                try:
                    results[(a, b)] = trace_cka(trace_dirs[a], trace_dirs[b], debiased=debiased, progress=progress)
                except TraceMismatchError as e:
                    why = str(e)
            if why is not None:
                skipped[(a, b)] = why
    mode_title = "Routing analysis" if len(summaries) == 1 else "Routing comparison"
    return write_report(summaries, out_dir, results, title or f"{mode_title}: {', '.join(summaries)}",
                        cka_skipped=skipped, roles=roles)


__all__ = ["analyze_traces", "fmt", "write_report"]
