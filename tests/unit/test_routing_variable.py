"""Routing analysis of variable experts per token (expert choice, ReLU, null experts): trace format 2 (empty
slots -1, null ids N..N+M-1; version 1 still reads), the recorder's row conversion, statistics and the summary,
with known answers.

Legend: T tokens, K slots per row, N real experts, M null experts, V label values.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from megatron_moe_ext.analysis.routing_recorder import selections_from_map
from megatron_moe_ext.analysis.statistics import (
    expert_counts,
    expert_label_counts,
    experts_per_token,
    experts_per_token_histogram,
    null_fraction,
    path_diversity,
    routing_pairs,
    specialisation,
)
from megatron_moe_ext.analysis.summary import summarize_trace
from megatron_moe_ext.analysis.trace_format import LayerSpec, TraceReader, TraceWriter

# 4 tokens, N = 3 real experts, M = 2 null experts (ids 3, 4), K = 3 slots, -1 = empty.
IDS_TK = np.array([[0, 1, 3], [2, -1, -1], [-1, -1, -1], [4, 0, -1]])
GATES_TK = np.array([[0.5, 0.3, 0.2], [0.9, 0, 0], [0, 0, 0], [0.6, 0.4, 0]], dtype=np.float32)


def test_selections_from_map_pads_variable_rows() -> None:
    probs_TE = torch.tensor([[0.1, 0.5, 0.0, 0.4], [0.0, 0.0, 0.0, 0.0], [0.3, 0.2, 0.6, 0.0]])
    map_TE = torch.tensor([[True, True, False, True], [False] * 4, [True, False, True, False]])
    ids, gates = selections_from_map(probs_TE, map_TE, 4, pad=True)
    assert ids.tolist() == [[1, 3, 0, -1], [-1, -1, -1, -1], [2, 0, -1, -1]]
    assert gates.flatten().tolist() == pytest.approx([0.5, 0.4, 0.1, 0, 0, 0, 0, 0, 0.6, 0.3, 0, 0])
    # fixed top-k rows (pad=False): the selected ids ordered by gate, as before version 2
    ids, gates = selections_from_map(probs_TE[[0, 2]], map_TE[[0, 2]], 2, pad=False)
    assert ids.tolist() == [[1, 3], [2, 0]]


def test_load_and_experts_per_token_known_answers() -> None:
    assert expert_counts(IDS_TK, 5).tolist() == [2, 1, 1, 1, 1]  # -1 slots not counted
    assert experts_per_token(IDS_TK, 3).tolist() == [2, 1, 0, 1]  # null ids (3, 4) spend nothing
    assert experts_per_token_histogram(IDS_TK, 3).tolist() == [1, 2, 1, 0]  # K + 1 = 4 bins
    assert null_fraction(IDS_TK, 3) == pytest.approx(2 / 6)  # 6 used slots, 2 null
    assert math.isnan(null_fraction(np.full((2, 2), -1), 3))
    assert expert_label_counts(IDS_TK, np.array([0, 1, 0, 1]), 5, 2).tolist() == [
        [1, 1], [1, 0], [0, 1], [1, 0], [0, 1]]
    with pytest.raises(ValueError, match=r"spans \[-2, 4\].*-1: an empty slot"):
        expert_counts(np.array([[-2, 4]]), 5)


def test_pairs_mi_weights_variable_rows() -> None:
    """Used slots only, weight 1/(K_t J_t); a token without experts is one (-1) sample of weight 1."""
    xs, ys, w = routing_pairs(IDS_TK, np.array([7, 8, 9, 7]), "pairs")
    assert list(zip(xs.tolist(), ys.tolist())) == [(0, 7), (1, 7), (3, 7), (2, 8), (-1, 9), (4, 7), (0, 7)]
    assert w.tolist() == pytest.approx([1 / 3] * 3 + [1.0, 1.0, 0.5, 0.5])
    assert w.sum() == pytest.approx(4)  # each token weighs 1


def test_specialisation_with_no_expert_category() -> None:
    """Label 0 tokens always get expert 1, label 1 tokens get no expert: top-1 carries all of H(label) = log 2."""
    labels_T = np.array([0, 1] * 50)
    ids_TK = np.where(labels_T[:, None] == 0, np.array([[1, -1]]), np.array([[-1, -1]]))
    gates_TK = (ids_TK >= 0).astype(np.float32)
    mi = specialisation(ids_TK, labels_T, gates_TK)
    assert mi.nats == pytest.approx(math.log(2))
    # set paths of a variable layer: distinct sets {1} and {} out of sum_{j<=2} C(3, j) = 7 possible sets
    p = path_diversity([ids_TK], [3], mode="set", variable_by_layer=[True])
    assert (p.distinct, p.max_paths) == (2, 7)
    assert path_diversity([ids_TK], [3], mode="top1", variable_by_layer=[True]).max_paths == 4  # N + "no expert"


SPECS = [LayerSpec(layer=1, num_experts=3, top_k=3, null_experts=2, variable=True),
         LayerSpec(layer=2, num_experts=4, top_k=2)]


def _write(path, n_copies: int = 5) -> None:
    with TraceWriter(path, SPECS, has_labels=True, chunk_tokens=6) as w:
        for i in range(n_copies):
            T = IDS_TK.shape[0]
            fixed = np.array([[0, 1], [2, 3], [1, 0], [3, 2]])
            w.append(np.arange(T) + 10, np.arange(T), np.full(T, i), {1: (IDS_TK, GATES_TK),
                     2: (fixed, np.full((T, 2), 0.5, np.float32))}, labels_T=np.array([0, 1, 0, 1]))


def test_trace_round_trip_and_refusals(tmp_path) -> None:
    _write(tmp_path / "t")
    r = TraceReader(tmp_path / "t")
    assert r.manifest["version"] == 2
    assert r.layer_spec(1) == SPECS[0] and r.layer_spec(2) == SPECS[1]
    assert "null_experts" not in r.manifest["layers"][1]  # only written when used
    layer = r.load_layer(1)
    assert (layer.expert_ids_TK[:4] == IDS_TK).all()
    with pytest.raises(ValueError, match=r"span \[-1, 3\], expected \[0, num_experts=4 \+ null_experts=0\)"):
        TraceWriter(tmp_path / "x", SPECS[1:]).append([1], [0], [0], {2: (np.array([[3, -1]]), np.zeros((1, 2)))})
    with pytest.raises(ValueError, match="empty slot .* non-zero gate; fix: gate 0"):
        TraceWriter(tmp_path / "y", SPECS[:1]).append([1], [0], [0], {1: (np.array([[0, -1, -1]]),
                                                                          np.array([[0.5, 0.1, 0]]))})
    with pytest.raises(ValueError, match="top_k=6 exceeds num_experts \\+ null_experts = 5"):
        LayerSpec(layer=0, num_experts=3, top_k=6, null_experts=2)


def test_version_1_trace_still_reads(tmp_path) -> None:
    with TraceWriter(tmp_path / "v1", SPECS[1:]) as w:
        w.append([1, 2], [0, 1], [0, 0], {2: (np.array([[0, 1], [2, 3]]), np.ones((2, 2)))})
    schema = tmp_path / "v1" / "schema.json"
    manifest = json.loads(schema.read_text())
    manifest["version"] = 1
    schema.write_text(json.dumps(manifest))
    r = TraceReader(tmp_path / "v1")
    assert r.layer_spec(2).null_experts == 0 and not r.layer_spec(2).variable
    manifest["version"] = 3
    schema.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"version 3, this reader reads .* versions \[1, 2\]"):
        TraceReader(tmp_path / "v1")


def test_summary_experts_per_token_and_null_fraction(tmp_path) -> None:
    _write(tmp_path / "t")
    summary = summarize_trace(tmp_path / "t", mode="pairs")
    var, fixed = summary.layers
    assert var.experts_per_token_J.tolist() == [5, 10, 5, 0]
    assert var.mean_active_experts == pytest.approx(1.0)  # (2 + 1 + 0 + 1) / 4
    assert var.null_fraction == pytest.approx(2 / 6)
    assert var.load.counts_N.tolist() == [10, 5, 5]  # real experts only
    assert (var.null_experts, var.variable) == (2, True)
    assert fixed.experts_per_token_J.tolist() == [0, 0, 20] and fixed.null_fraction is None
    # labels: expert-choice rows of label 0 are {0,1,null 3} and {empty}; MI is finite and >= 0
    assert summary.layers[0].specialisation["label"].nats >= 0
    assert summary.dependence[0].mi.nats > 0
    text = json.dumps(summary.to_json())
    layer_json = json.loads(text)["layers"][0]
    assert layer_json["experts_per_token"] == {"histogram": [5, 10, 5, 0], "mean": 1.0}
    assert layer_json["null_fraction"] == pytest.approx(1 / 3)
