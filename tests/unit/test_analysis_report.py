"""Routing summary, plots and report on small synthetic traces: the streamed summary equals the direct statistics
on the loaded arrays (exactly uniform layer: entropy log N; planted-label router: MI = H(label)), a 64 x 64 =
4096-expert product-key layer writes only bounded JSON, the report's files and PNGs exist and its tables print
summary.json's values, compare mode with CKA (a trace against itself: diagonal 1), token mismatch and missing
hidden states are refused, an existing out_dir is refused untouched, and a failure mid-report leaves nothing.

Legend: T tokens, K selections per token, N experts, V labels, D hidden size, La / Lb hidden-state layers.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_moe_ext.analysis import (
    LayerSpec,
    TraceReader,
    TraceWriter,
    bucket_positions,
    effective_experts,
    expert_counts,
    expert_label_counts,
    head_overlap,
    load_stats,
    path_diversity,
    plots,
    routing_dependence,
    specialisation,
)
from megatron_moe_ext.analysis.report import analyze_traces, fmt, write_report
from megatron_moe_ext.analysis.summary import (
    MAX_HISTOGRAM_BINS,
    TraceMismatchError,
    bin_counts,
    self_cka,
    summarize_trace,
    trace_cka,
)

pytest.importorskip("matplotlib")

T, V, D = 1200, 4, 8
LABEL_P = [0.4, 0.3, 0.2, 0.1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tokens(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"token_ids_T": rng.integers(5, 300, T), "positions_T": np.arange(T) % 100,
            "sequence_ids_T": np.arange(T) // 100, "labels_T": rng.choice(V, size=T, p=LABEL_P)}


def _write(path, specs, routing, hidden, tokens, chunk_tokens: int, batch: int = 250, has_labels: bool = True):
    with TraceWriter(path, specs, has_labels=has_labels, chunk_tokens=chunk_tokens) as w:
        for s in range(0, T, batch):
            sl = slice(s, s + batch)
            w.append(tokens["token_ids_T"][sl], tokens["positions_T"][sl], tokens["sequence_ids_T"][sl],
                     {l: (ids[sl], g[sl]) for l, (ids, g) in routing.items()},
                     labels_T=tokens["labels_T"][sl] if has_labels else None,
                     hidden={l: h[sl] for l, h in hidden.items()})
    return str(path)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    rng = np.random.default_rng(1)
    tok = _tokens()
    labels_T = tok["labels_T"]
    # Layer 0: planted-label top-2 router over 16 experts (column 0 = 3 * label, the larger gate; column 1 noise).
    ids0 = np.stack([3 * labels_T, rng.integers(0, 16, T)], 1)
    g0 = np.tile(np.array([0.7, 0.3], np.float32), (T, 1))
    # Layer 1: exactly uniform top-2 over 16 experts (every expert gets T * 2 / 16 selections).
    ids1 = np.stack([np.arange(T) * 2 % 16, (np.arange(T) * 2 + 1) % 16], 1)
    g1 = rng.dirichlet([1, 1], T).astype(np.float32)
    # Layer 2: product-key layer, 64 x 64 = 4096 experts, 4 heads x 4 selections, random.
    ids2 = rng.integers(0, 4096, (T, 16))
    g2 = rng.dirichlet(np.ones(16), T).astype(np.float32)
    h0 = rng.normal(size=(T, D)).astype(np.float32)
    h1 = (h0 @ rng.normal(size=(D, D)) + 0.5 * rng.normal(size=(T, D))).astype(np.float32)
    specs_a = [LayerSpec(0, 16, 2, hidden_size=D), LayerSpec(1, 16, 2, hidden_size=D),
               LayerSpec(2, 4096, 16, num_heads=4)]
    routing_a = {0: (ids0, g0), 1: (ids1, g1), 2: (ids2, g2)}
    a = _write(root / "a", specs_a, routing_a, {0: h0, 1: h1}, tok, chunk_tokens=300)
    # Model b: same tokens, other routing and hidden states, different chunking (450 vs 300 rows).
    specs_b = [LayerSpec(0, 8, 1, hidden_size=D), LayerSpec(1, 8, 1, hidden_size=6)]
    routing_b = {0: (rng.integers(0, 8, (T, 1)), np.ones((T, 1), np.float32)),
                 1: (rng.integers(0, 8, (T, 1)), np.ones((T, 1), np.float32))}
    rotation_DD = np.linalg.qr(rng.normal(size=(D, D)))[0]
    hidden_b = {0: (3.0 * h0 @ rotation_DD).astype(np.float32), 1: rng.normal(size=(T, 6)).astype(np.float32)}
    b = _write(root / "b", specs_b, routing_b, hidden_b, tok, chunk_tokens=450)
    # Model c: like b, but one token id differs (row 777): CKA against a must refuse.
    tok_c = dict(tok, token_ids_T=tok["token_ids_T"].copy())
    tok_c["token_ids_T"][777] += 1
    c = _write(root / "c", specs_b, routing_b, hidden_b, tok_c, chunk_tokens=450)
    # Model d: no hidden states, no labels.
    d = _write(root / "d", [LayerSpec(0, 8, 1)], {0: routing_b[0]}, {}, tok, chunk_tokens=500, has_labels=False)
    return {"a": a, "b": b, "c": c, "d": d, "tokens": tok}


@pytest.fixture(scope="module")
def summary_a(traces):
    return summarize_trace(traces["a"])


def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", path
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _label_entropy(labels_T: np.ndarray) -> float:
    p = np.bincount(labels_T) / labels_T.shape[0]
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _lists(x, out):
    """Every list length in a JSON document (to check the output is bounded)."""
    if isinstance(x, dict):
        for v in x.values():
            _lists(v, out)
    elif isinstance(x, list):
        out.append(len(x))
        for v in x:
            _lists(v, out)
    return out


# ---------------------------------------------------------------------------------------------------- summary


def test_summary_equals_direct_statistics(traces, summary_a, capsys):
    r = TraceReader(traces["a"])
    tok = traces["tokens"]
    full = {l: r.load_layer(l) for l in (0, 1, 2)}
    assert summary_a.num_tokens == T and [s.layer for s in summary_a.layers] == [0, 1, 2]
    assert summary_a.hidden_layers == [0, 1]
    for s in summary_a.layers:
        ids, gates = full[s.layer].expert_ids_TK, full[s.layer].gates_TK
        one = load_stats(expert_counts(ids, s.num_experts))
        np.testing.assert_array_equal(s.load.counts_N, one.counts_N)
        assert (s.load.max_violation, s.load.dead_count, s.load.entropy_nats) == pytest.approx(
            (one.max_violation, one.dead_count, one.entropy_nats), rel=1e-12)
        for var, values in (("token", tok["token_ids_T"]), ("position", bucket_positions(tok["positions_T"], 16)),
                            ("label", tok["labels_T"])):
            direct = specialisation(ids, values, gates)
            got = s.specialisation[var]
            assert (got.nats, got.bias_nats, got.corrected_nats) == pytest.approx(
                (direct.nats, direct.bias_nats, direct.corrected_nats), rel=1e-9, abs=1e-12), (s.layer, var)
        top = s.label_matrix.experts
        np.testing.assert_array_equal(s.label_matrix.counts_EV,
                                      expert_label_counts(ids, tok["labels_T"], s.num_experts, V)[top])
        assert s.tokens == T
    # Known answers: uniform layer -> entropy log N, MaxVio 0; planted labels -> MI = H(label).
    l0, l1, l2 = summary_a.layers
    assert l1.load.entropy_nats == pytest.approx(math.log(16), abs=1e-12) and l1.load.max_violation == 0
    assert l0.specialisation["label"].nats == pytest.approx(_label_entropy(tok["labels_T"]), abs=1e-12)
    # Layer pairs, paths, heads, effective experts.
    for dep, (la, lb) in zip(summary_a.dependence, [(0, 1), (1, 2)]):
        direct = routing_dependence(full[la].expert_ids_TK, full[lb].expert_ids_TK, full[la].gates_TK,
                                    full[lb].gates_TK)
        assert (dep.layer_a, dep.layer_b) == (la, lb)
        assert (dep.mi.nats, dep.mi.bias_nats) == pytest.approx((direct.nats, direct.bias_nats), rel=1e-9)
    windows = [[0, 1, 2], [0, 1], [1, 2]]
    assert [p.layers for p in summary_a.paths] == windows
    for p in summary_a.paths:
        direct = path_diversity([full[l].expert_ids_TK for l in p.layers], [{0: 16, 1: 16, 2: 4096}[l] for l in
                                                                             p.layers],
                                [full[l].gates_TK for l in p.layers])
        assert (p.diversity.distinct, p.diversity.of_max) == (direct.distinct, direct.of_max)
    assert l0.head_overlap is None and l2.head_overlap == pytest.approx(head_overlap(full[2].expert_ids_TK, 4))
    assert l2.effective.entropy == pytest.approx(float(effective_experts(full[2].gates_TK).mean()), rel=1e-9)
    assert l0.effective.inverse_simpson == pytest.approx(
        float(effective_experts(full[0].gates_TK, "inverse_simpson").mean()), rel=1e-9)
    # "pairs" mode: every selection is a sample of weight 1/K (per layer pair 1/(K J)), as in statistics.
    pairs = summarize_trace(traces["a"], mode="pairs")
    direct = specialisation(full[0].expert_ids_TK, tok["labels_T"], mode="pairs")
    assert pairs.layer(0).specialisation["label"].nats == pytest.approx(direct.nats, rel=1e-9)
    direct = routing_dependence(full[0].expert_ids_TK, full[1].expert_ids_TK, mode="pairs")
    assert pairs.dependence[0].mi.nats == pytest.approx(direct.nats, rel=1e-9)
    # progress=True prints a line per chunk to stderr.
    summarize_trace(traces["d"], progress=True)
    err = capsys.readouterr().err
    assert err.count("chunk ") == TraceReader(traces["d"]).num_chunks and "1200/1200 tokens" in err


def test_big_layer_output_is_bounded(summary_a):
    l2 = summary_a.layer(2)
    assert l2.load.counts_N.shape == (4096,)  # in memory for plots
    edges, hist = bin_counts(l2.load.counts_N)
    assert hist.shape == (MAX_HISTOGRAM_BINS,) and (np.diff(edges) == 16).all()
    np.testing.assert_array_equal(hist, l2.load.counts_N.reshape(256, 16).sum(1))
    doc = summary_a.to_json()
    json.dumps(doc, allow_nan=False)
    assert max(_lists(doc, [])) <= MAX_HISTOGRAM_BINS + 1  # no counts_N anywhere
    layer = doc["layers"][2]
    assert len(layer["top_experts"]["experts"]) == 32 and len(layer["label_matrix"]["counts"]) == 32
    assert layer["top_experts"]["counts"][0] == int(l2.load.counts_N.max())
    # A 16-expert layer keeps one histogram column per expert.
    assert doc["layers"][0]["load_histogram"]["counts"] == summary_a.layer(0).load.counts_N.tolist()


# ------------------------------------------------------------------------------------------------------- CKA


def test_cka_self_and_mismatch(traces):
    same = trace_cka(traces["a"], traces["a"])
    assert same.layers_a == same.layers_b == [0, 1]
    np.testing.assert_allclose(np.diag(same.cka_LaLb), 1.0, atol=1e-9)
    # Different chunking (300 vs 450 rows) is fine; a per-pass memory budget of one pair gives the same numbers.
    ab = trace_cka(traces["a"], traces["b"])
    ab_small = trace_cka(traces["a"], traces["b"], max_bytes=1)
    np.testing.assert_allclose(ab.cka_LaLb, ab_small.cka_LaLb, rtol=1e-12)
    assert ab.cka_LaLb[0, 0] == pytest.approx(1.0, abs=1e-6)  # b's layer 0 = a's rotated and scaled (fp16 storage)
    own = self_cka(traces["a"])
    np.testing.assert_allclose(own.cka_LaLb, same.cka_LaLb, atol=1e-9)
    with pytest.raises(TraceMismatchError, match="row 777: token_id"):
        trace_cka(traces["a"], traces["c"])
    with pytest.raises(ValueError, match="recorded no hidden states"):
        trace_cka(traces["d"], traces["a"])


# ---------------------------------------------------------------------------------------------------- report


def _table_rows(md: str, heading: str) -> list[list[str]]:
    section = md.split(heading, 1)[1]
    lines = [l for l in section.splitlines() if l.startswith("| ")]
    rows = []
    for l in lines[1:]:
        if l.startswith("| model"):
            break
        rows.append([c.strip() for c in l.strip("|").split("|")])
    return rows


def test_analyze_report(traces, tmp_path):
    out = tmp_path / "report"
    path = analyze_traces({"fine": traces["a"]}, out)
    assert path == str(out / "report.md") and sorted(os.listdir(tmp_path)) == ["report"]
    doc = json.loads((out / "summary.json").read_text())
    md = Path(path).read_text()
    assert doc["mode"] == "analyze" and list(doc["models"]) == ["fine"]
    pngs = sorted(os.listdir(out / "figures"))
    assert "load_balance.png" in pngs and "path_diversity.png" in pngs and any("cka" in p for p in pngs)
    for png in pngs:
        assert f"figures/{png}" in md
        w, h = _png_size(str(out / "figures" / png))
        assert w >= 400 and h >= 300, (png, w, h)
    # Load table: every row's numbers are summary.json's values as fmt() prints them.
    layers = {l["layer"]: l for l in doc["models"]["fine"]["layers"]}
    rows = _table_rows(md, "## Load balance")
    assert len(rows) == 3
    for row in rows:
        l = layers[int(row[1])]
        assert row[6:11] == [fmt(l[k]) for k in ("max_violation", "dead_count", "dead_fraction", "entropy_nats",
                                                 "entropy_normalized")]
    assert float(rows[1][9]) == pytest.approx(math.log(16), rel=1e-5)
    label0 = layers[0]["specialisation"]["label"]
    assert f"| fine | 0 | label | {fmt(label0['nats'])} | {fmt(label0['bias_nats'])} | " \
           f"{fmt(label0['corrected_nats'])} |" in md
    assert doc["cka"][0]["model_a"] == doc["cka"][0]["model_b"] == "fine"  # self-similarity
    assert doc["cka"][0]["matrix"][0][0] == 1.0


def test_compare_report(traces, tmp_path):
    out = tmp_path / "cmp"
    path = analyze_traces({"fine": traces["a"], "coarse": traces["b"], "shifted": traces["c"],
                           "plain": traces["d"]}, out)
    doc = json.loads((out / "summary.json").read_text())
    md = Path(path).read_text()
    assert doc["mode"] == "compare" and list(doc["models"]) == ["fine", "coarse", "shifted", "plain"]
    assert "| layer | statistic | fine | coarse | shifted | plain |" in md
    pairs = {(c["model_a"], c["model_b"]): c for c in doc["cka"]}
    assert set(pairs) == {("fine", "fine"), ("coarse", "coarse"), ("shifted", "shifted"), ("fine", "coarse")}
    fc = pairs[("fine", "coarse")]
    assert np.array(fc["matrix"]).shape == (2, 2) and fc["layers_a"] == [0, 1]
    assert f"| layer 0 | {fmt(fc['matrix'][0][0])} | {fmt(fc['matrix'][0][1])} |" in md
    skipped = {(s["model_a"], s["model_b"]): s["reason"] for s in doc["cka_skipped"]}
    assert "differ at token row 777" in skipped[("fine", "shifted")]
    assert "differ at token row 777" in skipped[("coarse", "shifted")]
    assert "no hidden states" in skipped[("fine", "plain")]
    for png in os.listdir(out / "figures"):
        _png_size(str(out / "figures" / png))


def test_existing_out_dir_refused_untouched(traces, summary_a, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists.*choose a new directory or delete"):
        write_report({"fine": summary_a}, out)
    with pytest.raises(ValueError, match="already exists"):
        analyze_traces({"fine": traces["a"]}, out)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_failure_mid_report_leaves_nothing(summary_a, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "plot_expert_load", boom)  # after two figures are already written
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report({"fine": summary_a}, tmp_path / "report")
    assert os.listdir(tmp_path) == []


def test_interrupted_report_leaves_nothing(summary_a, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C mid-report

    monkeypatch.setattr(plots, "plot_expert_load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report({"fine": summary_a}, tmp_path / "report")
    assert os.listdir(tmp_path) == []


def test_missing_matplotlib_says_how_to_install(summary_a, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import of it raises ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'megatron-moe-ext[plots]'")):
        plots.plot_load_balance({"fine": summary_a}, tmp_path / "x.png")
