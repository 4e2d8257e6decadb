"""Report wiring of the instruments (analysis/report.py, summary.py) and the five-question report
(analysis/questions_report.py): a trace's instruments.json and the trace readouts its metadata names land in
summary.json under their names and in report.md sections (figures relinked per model, "not applicable" printed);
compare with roles adds the five questions, whose readings restate the numbers (known answers: the lowest loss,
the spread over two seeds, granularity ordered by N); bad roles and unfinished sweeps are refused with the fix.

Legend: T tokens, K selections per token, N experts.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_moe_ext.analysis.questions_report import QUESTIONS, questions_section, sweep_models
from megatron_moe_ext.analysis.report import analyze_traces
from megatron_moe_ext.analysis.summary import INSTRUMENTS_FILE, summarize_trace
from megatron_moe_ext.analysis.trace_format import LayerSpec, TraceWriter

pytest.importorskip("matplotlib")
T = 600


def _stat(mean, lo, hi):
    return {"mean": mean, "ci95": [lo, hi], "tokens": 100, "windows": 10}


def _moefication(loss, share):
    return {"calibration": "c", "selection": "s", "clusters": 4, "topk": 1,
            "clean_loss": _stat(loss, loss - .1, loss + .1),
            "dense": {"not_applicable": "no dense FFN layers"},
            "moe": {"layers": {"1": {"share_routed": _stat(share, share - .01, share + .01), "top_k": 2,
                                     "num_experts": 8}},
                    "loss_all_experts": _stat(loss, loss, loss), "loss_change_routed_vs_all": _stat(0.0, 0.0, 0.0)}}


def _trace(path, n_experts, readouts, instruments):
    rng = np.random.default_rng(n_experts)
    with TraceWriter(path, [LayerSpec(1, n_experts, 2, hidden_size=4)], has_labels=True,
                     metadata={"readouts": readouts}) as w:
        ids = np.stack([rng.choice(n_experts, 2, replace=False) for _ in range(T)])
        w.append(np.arange(T) % 50, np.arange(T) % 60, np.arange(T) // 60, {1: (ids, np.full((T, 2), .5, np.float32))},
                 labels_T=np.arange(T) % 3, hidden={1: rng.normal(size=(T, 4)).astype(np.float32)})
    if instruments is not None:
        with open(os.path.join(path, INSTRUMENTS_FILE), "w") as f:
            json.dump(instruments, f)
    return str(path)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    return {"G1_s0": _trace(root / "a", 8, ["coactivation"], {"moefication": _moefication(2.0, 0.9),
                                                              "expert_ablation": {"not_applicable": "why not"}}),
            "G1_s1": _trace(root / "b", 8, [], {"moefication": _moefication(2.2, 0.8)}),
            "dense-compute_s0": _trace(root / "c", 8, [], None)}


def test_instrument_results_in_summary_and_report(traces, tmp_path):
    s = summarize_trace(traces["G1_s0"])
    assert sorted(s.instruments) == ["coactivation", "expert_ablation", "moefication"]
    assert "coactivation" in s.to_json() and s.to_json()["instruments"] == sorted(s.instruments)
    assert summarize_trace(traces["dense-compute_s0"]).instruments == {}
    report = analyze_traces({"m": traces["G1_s0"]}, tmp_path / "r")
    doc = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert doc["models"]["m"]["moefication"]["clean_loss"]["mean"] == 2.0
    md = open(report).read()
    assert "## moefication" in md and "| 1 | 8 | 2 | 0.9 [0.89, 0.91] |" in md
    assert "## expert_ablation" in md and "Not applicable: why not" in md
    # the coactivation module's own section (and its figures, relinked under figures/<instrument>-<i>-<model>/)
    for link in [l for l in md.split("\n") if "](figures/" in l and "coactivation" in l.lower()]:
        rel = link.split("](")[1].rstrip(")")
        assert os.path.isfile(tmp_path / "r" / rel), rel


def test_compare_with_roles_has_the_five_questions(traces, tmp_path):
    roles = {"G1_s0": "moe", "G1_s1": "moe", "dense-compute_s0": "dense_equal_compute"}
    report = analyze_traces(traces, tmp_path / "c", roles=roles)
    md = open(report).read()
    doc = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert doc["roles"] == roles
    for i, q in enumerate(QUESTIONS, 1):
        assert f"## Q{i}. {q}" in md
    # Q5: the two seeds of G1 are one configuration: mean 2.1, sd of (2.0, 2.2) = 0.141421
    assert "| G1 | moe | 8 | 2.1 | 2 seeds, sd 0.141421 |" in md
    assert "Reading: lowest loss 2.1 (G1, moe); equal-compute dense n/a" in md
    # compare: each model's moefication part under its own heading
    assert "## moefication" in md and "### `G1_s1`" in md


def test_questions_known_answers():
    def model(n_experts, mi, loss=None, cka_extra=None):
        layer = {"layer": 1, "num_experts": n_experts, "top_k": 2, "entropy_normalized": 0.9,
                 "specialisation": {"label": {"corrected_nats": mi}}}
        m = {"layers": [layer], "path_diversity": [{"of_max": 0.5, "distinct": 5, "num_tokens": 10}]}
        if loss is not None:
            m["moefication"] = _moefication(loss, 0.9)
        return m

    summaries = {"G1": model(4, 0.1, 3.0), "G16": model(64, 0.3, 2.5), "dense": model(1, None, 2.8)}
    roles = {"G1": "moe", "G16": "moe", "dense": "dense_equal_params"}
    cka = [{"model_a": "G1", "model_b": "dense", "matrix": [[0.8, 0.1], [0.2, 0.6]]}]
    md = questions_section(summaries, roles, cka=cka)
    assert "from N = 4 to N = 64 experts, label MI 0.1 -> 0.3 nats" in md
    assert "mean CKA of the MoE models with the equal-parameter dense model 0.7;" in md
    assert "Reading: lowest loss 2.5 (G16, moe); equal-compute dense n/a, equal-parameter dense 2.8." in md
    with pytest.raises(ValueError, match="expected one of"):
        questions_section(summaries, {"G1": "wide"})
    with pytest.raises(ValueError, match="not in the comparison"):
        questions_section(summaries, {"X": "moe"})


def test_sweep_models(tmp_path):
    runs = [{"run": "b_G1_s0", "kind": "moe"}, {"run": "b_dense-compute_s0", "kind": "dense_equal_compute"},
            {"run": "b_dense-params-E4_s0", "kind": "dense_equal_params"}]
    (tmp_path / "runs.json").write_text(json.dumps({"runs": runs}))
    for r in runs[:2]:
        (tmp_path / r["run"] / "ckpt").mkdir(parents=True)
        (tmp_path / r["run"] / "ckpt" / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(ValueError, match=r"b_dense-params-E4_s0.*fix: finish them with `megatron-moe-ext sweep run"):
        sweep_models(str(tmp_path))
    assert sweep_models(str(tmp_path), allow_unfinished=True) == [
        ("b_G1_s0", str(tmp_path / "b_G1_s0" / "ckpt"), "moe"),
        ("b_dense-compute_s0", str(tmp_path / "b_dense-compute_s0" / "ckpt"), "dense_equal_compute")]
    with pytest.raises(ValueError, match="is not a sweep directory"):
        sweep_models(str(tmp_path / "b_G1_s0"))
