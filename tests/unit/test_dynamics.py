"""Router saturation and the other routing-dynamics curves (analysis/dynamics.py) on known answers: identical
routing saturates at 1, disjoint at 0, a planted half overlap at 0.5, routing independent of the final one at
chance k / N; the load distance of equal/disjoint loads; the curves over synthetic traces; the routing-checkpoint
options' refusals (training/routing_checkpoints.py) name the value and the fix.

Legend: T tokens, K selections per token, N experts.
"""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moe_ext.analysis.dynamics import (
    chance_saturation,
    dynamics_curves,
    dynamics_json,
    load_distance,
    router_saturation,
    topk_overlap,
    trace_saturation,
)
from megatron_moe_ext.analysis.summary import TraceMismatchError, summarize_trace
from megatron_moe_ext.analysis.trace_format import LayerSpec, TraceWriter
from megatron_moe_ext.training.routing_checkpoints import check_routing_checkpoints, parse_iterations

T, N, K = 2000, 16, 4


def test_topk_overlap_known_answers():
    a_TK = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [9, 9, 1, 2]])
    b_TK = np.array([[3, 2, 1, 0], [0, 1, 2, 3], [0, 1, 8, 9], [9, 1, 5, 6]])
    # order ignored (1), disjoint (0), half shared (0.5), a duplicated id counts once ({9, 1} of {9, 1, 5, 6})
    np.testing.assert_allclose(topk_overlap(a_TK, b_TK), [1.0, 0.0, 0.5, 0.5])
    assert router_saturation(a_TK, a_TK) == 1.0  # duplicates too (PEER heads picking one expert twice)
    assert router_saturation(a_TK, b_TK) == pytest.approx(0.5)
    np.testing.assert_allclose(topk_overlap(np.array([[1, 2, 3, 4]]), np.array([[1, 1, 2, 2]])), [1.0])
    with pytest.raises(ValueError, match="same shape"):
        topk_overlap(a_TK, b_TK[:, :2])


def test_overlap_of_variable_rows_ignores_empty_slots():
    """Routers with variable experts per token pad rows with -1: padding is no selection. Final rows {0}, {1, 2},
    {} (routed nowhere: left out of the mean), {3}; the checkpoint {1}, {2}, {0, 1, 2}, {3}."""
    a_TK = np.array([[1, -1, -1], [2, -1, -1], [0, 1, 2], [3, -1, -1]])
    b_TK = np.array([[0, -1, -1], [2, 1, -1], [-1, -1, -1], [3, -1, -1]])
    o_T = topk_overlap(a_TK, b_TK)
    np.testing.assert_allclose(o_T[[0, 1, 3]], [0.0, 0.5, 1.0])
    assert np.isnan(o_T[2])
    assert router_saturation(a_TK, b_TK) == pytest.approx(0.5)


def test_trace_saturation_of_variable_rows(tmp_path):
    """The same rows as above through traces (variable layer, rows padded with -1): the token the final checkpoint
    routes nowhere is left out instead of making the layer's saturation NaN."""
    a_TK = np.array([[1, -1, -1], [2, -1, -1], [0, 1, 2], [3, -1, -1]])
    b_TK = np.array([[0, -1, -1], [2, 1, -1], [-1, -1, -1], [3, -1, -1]])
    for name, ids in (("a", a_TK), ("b", b_TK)):
        with TraceWriter(tmp_path / name, [LayerSpec(1, 4, 3, variable=True)]) as w:
            w.append(np.arange(4), np.zeros(4, np.int64), np.zeros(4, np.int64),
                     {1: (ids, np.where(ids >= 0, 0.5, 0.0))})
    assert trace_saturation(tmp_path / "a", tmp_path / "b") == {1: pytest.approx(0.5)}
    assert trace_saturation(tmp_path / "b", tmp_path / "b") == {1: 1.0}


def test_independent_routing_saturates_at_chance():
    rng = np.random.default_rng(0)
    a_TK = np.stack([rng.choice(N, K, replace=False) for _ in range(T)])
    b_TK = np.stack([rng.choice(N, K, replace=False) for _ in range(T)])
    assert chance_saturation(K, N) == K / N
    # mean of T hypergeometric / K draws: standard error sqrt(var / T) ~ 0.005
    assert router_saturation(a_TK, b_TK) == pytest.approx(K / N, abs=0.02)
    with pytest.raises(ValueError, match="top_k"):
        chance_saturation(5, 4)


def test_load_distance_known_answers():
    assert load_distance(np.array([1, 1, 2]), np.array([2, 2, 4])) == 0.0
    assert load_distance(np.array([5, 0, 0]), np.array([0, 3, 3])) == 1.0
    assert load_distance(np.array([1, 1]), np.array([1, 0])) == pytest.approx(0.5)


def _trace(path, ids_by_layer, tokens_T, labels_T, chunk_tokens=700):
    specs = [LayerSpec(l, N, ids.shape[1]) for l, ids in ids_by_layer.items()]
    with TraceWriter(path, specs, has_labels=True, chunk_tokens=chunk_tokens) as w:
        for s in range(0, T, 500):
            sl = slice(s, s + 500)
            w.append(tokens_T[sl], np.arange(T)[sl] % 100, np.arange(T)[sl] // 100,
                     {l: (ids[sl], np.full(ids[sl].shape, 1.0 / ids.shape[1], np.float32))
                      for l, ids in ids_by_layer.items()}, labels_T=labels_T[sl])
    return str(path)


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("dyn")
    rng = np.random.default_rng(1)
    tokens_T = rng.integers(0, 300, T)
    labels_T = rng.integers(0, 4, T)
    final_TK = np.stack([rng.choice(N, K, replace=False) for _ in range(T)])
    # iteration 0: independent routing; iteration 10: half of each token's experts final (2 of 4 kept, the other
    # two replaced by experts outside the final set); the final one.
    early_TK = np.stack([rng.choice(N, K, replace=False) for _ in range(T)])
    half_TK = final_TK.copy()
    for t in range(T):
        half_TK[t, 2:] = rng.choice(np.setdiff1d(np.arange(N), final_TK[t]), 2, replace=False)
    dirs = {0: _trace(root / "it0", {1: early_TK}, tokens_T, labels_T),
            10: _trace(root / "it10", {1: half_TK}, tokens_T, labels_T),
            20: _trace(root / "it20", {1: final_TK}, tokens_T, labels_T)}
    other = _trace(root / "shifted", {1: final_TK}, np.roll(tokens_T, 1), labels_T)
    return dirs, other


def test_trace_saturation_and_curves(traces):
    dirs, other = traces
    assert trace_saturation(dirs[20], dirs[20]) == {1: 1.0}
    assert trace_saturation(dirs[10], dirs[20]) == {1: pytest.approx(0.5)}
    assert trace_saturation(dirs[0], dirs[20])[1] == pytest.approx(K / N, abs=0.02)
    with pytest.raises(TraceMismatchError, match="differ in chunk"):
        trace_saturation(other, dirs[20])
    summaries = {it: summarize_trace(d) for it, d in dirs.items()}
    points = dynamics_curves(summaries, dirs, final_iteration=20, tokens_per_iteration=64)
    assert [p.iteration for p in points] == [0, 10, 20] and [p.tokens for p in points] == [0, 640, 1280]
    assert points[-1].saturation == {1: 1.0} and points[-1].load_distance == {1: 0.0}
    assert points[1].saturation[1] == pytest.approx(0.5)
    doc = dynamics_json(points, final_iteration=20, tokens_per_iteration=64, chance={1: K / N})
    assert doc["layers"]["1"]["saturation"][1] == pytest.approx(0.5)
    assert doc["layers"]["1"]["chance_saturation"] == 0.25
    with pytest.raises(ValueError, match="the final one"):
        dynamics_curves(summaries, dirs, final_iteration=30, tokens_per_iteration=64)


def test_plot_dynamics(traces, tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_moe_ext.analysis.plots import plot_dynamics

    dirs, _ = traces
    summaries = {it: summarize_trace(d) for it, d in dirs.items()}
    doc = dynamics_json(dynamics_curves(summaries, dirs, final_iteration=20, tokens_per_iteration=64),
                        final_iteration=20, tokens_per_iteration=64, chance={1: K / N})
    path = plot_dynamics(doc, tmp_path / "d.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_routing_checkpoint_options_refused_with_the_fix():
    assert parse_iterations("50, 10,10,0") == (0, 10, 50)
    for bad, match in (("", "names no iteration"), ("10,x", "'x' is not an iteration"), ("-1", "'-1'")):
        with pytest.raises(ValueError, match=match):
            parse_iterations(bad)
    ok = dict(train_iters=100, save="s", ckpt_format="torch_dist", virtual_pipeline=None)
    check_routing_checkpoints((0, 99), **ok)
    with pytest.raises(ValueError, match=r"100 >= --train-iters 100.*fix: iterations below 100"):
        check_routing_checkpoints((10, 100), **ok)
    with pytest.raises(ValueError, match="needs --save"):
        check_routing_checkpoints((1,), **{**ok, "save": None})
    with pytest.raises(ValueError, match="fix: --ckpt-format torch_dist"):
        check_routing_checkpoints((1,), **{**ok, "ckpt_format": "torch"})
    with pytest.raises(ValueError, match="virtual pipeline"):
        check_routing_checkpoints((1,), **{**ok, "virtual_pipeline": 2})
