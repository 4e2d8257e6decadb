"""Routing-trace format: write/read round trip (chunking, per-layer top-k, PEER heads, opt-in hidden states,
labels, torch inputs, compression), sampling determinism independent of batching, the byte budget stop, the
atomic and crash-consistent manifest, refusal to overwrite, and bad input.

Legend: T tokens in a batch, K selections per token, N experts, D hidden size.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from megatron_moe_ext.analysis import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LayerSpec,
    TraceReader,
    TraceWriter,
)
from megatron_moe_ext.analysis.trace_format import sample_mask

# Layer 0: a top-2 MoE over 8 experts; layer 3: a PEER layer, 3 heads x 2 over 100 experts, hidden states on.
SPECS = [LayerSpec(layer=0, num_experts=8, top_k=2), LayerSpec(layer=3, num_experts=100, top_k=6, num_heads=3,
                                                               hidden_size=4)]


def _batch(start: int, T: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + start)
    return {"token_ids_T": np.arange(start, start + T), "positions_T": np.arange(T) % 5,
            "sequence_ids_T": np.arange(start, start + T) // 5,
            "routing": {0: (rng.integers(0, 8, (T, 2)), rng.random((T, 2)).astype(np.float32)),
                        3: (rng.integers(0, 100, (T, 6)), rng.random((T, 6)).astype(np.float32))},
            "labels_T": np.arange(start, start + T) % 3, "hidden": {3: rng.normal(size=(T, 4)).astype(np.float32)}}


def _write(path, sizes, **kw) -> tuple[TraceWriter, list[dict]]:
    batches, start = [], 0
    with TraceWriter(path, SPECS, has_labels=True, **kw) as w:
        for T in sizes:
            batches.append(_batch(start, T))
            w.append(**batches[-1])
            start += T
    return w, batches


def _cat(batches: list[dict], get) -> np.ndarray:
    return np.concatenate([get(b) for b in batches])


@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path, compress):
    _, batches = _write(tmp_path / "t", [5, 9, 3], chunk_tokens=7, compress=compress)
    r = TraceReader(tmp_path / "t")
    m = r.manifest
    assert (m["format"], m["version"], m["complete"], m["compressed"]) == (FORMAT_NAME, FORMAT_VERSION, True, compress)
    assert [c["num_tokens"] for c in m["chunks"]] == [7, 7, 3] and r.num_tokens == 17 and r.num_chunks == 3
    assert m["layers"][1] == {"layer": 3, "num_experts": 100, "top_k": 6, "num_heads": 3, "expert_dtype": "int32",
                              "gate_dtype": "float16", "hidden_size": 4, "hidden_dtype": "float16"}
    assert r.layers == SPECS
    chunks = list(r.iter_chunks(hidden=True))
    assert max(c.num_tokens for c in chunks) <= 7
    np.testing.assert_array_equal(np.concatenate([c.token_ids_T for c in chunks]), np.arange(17))
    np.testing.assert_array_equal(np.concatenate([c.labels_T for c in chunks]), np.arange(17) % 3)
    for layer in (0, 3):
        full = r.load_layer(layer, hidden=True)
        assert full.expert_ids_TK.dtype == np.int32 and full.gates_TK.dtype == np.float16
        ids_TK = np.concatenate([b["routing"][layer][0] for b in batches])
        gates_TK = np.concatenate([b["routing"][layer][1] for b in batches])
        np.testing.assert_array_equal(full.expert_ids_TK, ids_TK)
        np.testing.assert_array_equal(full.gates_TK, gates_TK.astype(np.float16))
    assert r.load_layer(0, hidden=True).hidden_TD is None  # layer 0 did not opt in
    np.testing.assert_array_equal(r.load_layer(3, hidden=True).hidden_TD,
                                  _cat(batches, lambda b: b["hidden"][3]).astype(np.float16))
    assert r.load_layer(3).hidden_TD is None  # hidden states are read only when asked for
    tokens = r.load_tokens()
    np.testing.assert_array_equal(tokens.sequence_ids_T, np.arange(17) // 5)
    only0 = next(r.iter_chunks(layers=[0]))
    assert list(only0.layers) == [0]
    assert not [f for f in os.listdir(tmp_path / "t") if ".tmp" in f]  # no temporaries left behind
    expected_bytes = 17 * (8 * 4 + 2 * (4 + 2) + 6 * (4 + 2) + 4 * 2)
    assert m["payload_bytes"] == expected_bytes


def test_torch_inputs_and_no_labels(tmp_path):
    spec = [LayerSpec(layer=1, num_experts=4, top_k=1)]
    with TraceWriter(tmp_path / "t", spec, expert_dtype=np.int64, gate_dtype=np.float32) as w:
        kept = w.append(torch.arange(6), torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long),
                        {1: (torch.tensor([[0], [1], [2], [3], [0], [1]]), torch.ones(6, 1))})
    assert kept == 6
    r = TraceReader(tmp_path / "t")
    assert not r.has_labels and r.load_tokens().labels_T is None
    assert r.load_layer(1).expert_ids_TK.dtype == np.int64 and r.load_layer(1).gates_TK.dtype == np.float32


def test_sampling_is_deterministic_and_independent_of_batching(tmp_path):
    def kept_ids(name, sizes, seed):
        _write(tmp_path / name, sizes, chunk_tokens=64, sample_p=0.3, seed=seed)
        return TraceReader(tmp_path / name).load_tokens().token_ids_T

    a = kept_ids("a", [100, 250, 650], seed=1)
    b = kept_ids("b", [1000], seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, kept_ids("c", [1000], seed=2))
    # Binomial(1000, 0.3): sd 14.5; allow 5 sd.
    assert abs(len(a) - 300) < 5 * 14.5
    m = TraceReader(tmp_path / "a").manifest
    assert (m["num_tokens_offered"], m["num_tokens"], m["sample_p"], m["seed"]) == (1000, len(a), 0.3, 1)
    # The routing rows follow their tokens through sampling.
    full = np.concatenate([_batch(0, 1000)["routing"][0][0]])
    np.testing.assert_array_equal(TraceReader(tmp_path / "b").load_layer(0).expert_ids_TK, full[b])
    keep = sample_mask(7, 0, 100_000, 0.25)
    assert abs(keep.mean() - 0.25) < 0.01 and np.array_equal(keep[500:600], sample_mask(7, 500, 100, 0.25))


def test_byte_budget_stops_the_writer(tmp_path):
    row = 8 * 4 + 2 * (4 + 2) + 6 * (4 + 2) + 4 * 2
    with TraceWriter(tmp_path / "t", SPECS, has_labels=True, chunk_tokens=4, byte_budget=10 * row + row // 2) as w:
        assert w.append(**_batch(0, 6)) == 6
        assert w.append(**_batch(6, 6)) == 4  # rows 10 and 11 do not fit
        assert w.stopped_by_budget
        assert w.append(**_batch(12, 6)) == 0
    r = TraceReader(tmp_path / "t")
    assert r.num_tokens == 10 and r.manifest["stopped_by_budget"] and r.manifest["payload_bytes"] <= 10.5 * row
    assert r.manifest["num_tokens_offered"] == 18
    np.testing.assert_array_equal(r.load_tokens().token_ids_T, np.arange(10))


def test_manifest_is_atomic_and_crash_consistent(tmp_path):
    path = tmp_path / "t"
    w = TraceWriter(path, SPECS, has_labels=True, chunk_tokens=4)
    # The manifest exists from the start, marked incomplete; readers refuse it unless asked.
    with open(path / "schema.json") as f:
        assert json.load(f)["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        TraceReader(path)
    w.append(**_batch(0, 6))  # one whole chunk of 4 on disk, 2 rows buffered
    partial = TraceReader(path, allow_incomplete=True)
    assert partial.num_chunks == 1 and partial.num_tokens == 4
    assert sorted(os.listdir(path)) == ["layer0000-000000.npz", "layer0003-000000.npz", "schema.json",
                                        "tokens-000000.npz"]
    w.close()
    assert TraceReader(path).num_tokens == 6
    # A crash inside the context manager leaves the whole chunks readable and the trace marked incomplete.
    with pytest.raises(RuntimeError), TraceWriter(tmp_path / "crash", SPECS, has_labels=True, chunk_tokens=4) as w2:
        w2.append(**_batch(0, 5))
        raise RuntimeError("capture failed")
    crashed = TraceReader(tmp_path / "crash", allow_incomplete=True)
    assert crashed.manifest["complete"] is False and crashed.num_tokens == 4
    with pytest.raises(ValueError, match="closed"):
        w2.append(**_batch(5, 1))


def test_bad_input(tmp_path):
    _write(tmp_path / "old", [3])
    with pytest.raises(ValueError, match="never overwrites"):
        TraceWriter(tmp_path / "old", SPECS)
    with pytest.raises(ValueError, match="not a routing trace"):
        TraceReader(tmp_path)
    with pytest.raises(ValueError, match="top_k=5 is not a multiple of num_heads=2"):
        LayerSpec(layer=0, num_experts=8, top_k=5, num_heads=2)
    with pytest.raises(ValueError, match="does not fit expert_dtype"):
        TraceWriter(tmp_path / "a", [LayerSpec(layer=0, num_experts=2**31 + 1, top_k=1)])
    with pytest.raises(ValueError, match="sample_p=0"):
        TraceWriter(tmp_path / "b", SPECS, sample_p=0)
    with pytest.raises(ValueError, match="repeat"):
        TraceWriter(tmp_path / "c", [SPECS[0], SPECS[0]])
    w = TraceWriter(tmp_path / "d", SPECS, has_labels=True)
    b = _batch(0, 4)
    with pytest.raises(ValueError, match=r"routing has layers \[0\], the trace has \[0, 3\]"):
        w.append(**{**b, "routing": {0: b["routing"][0]}})
    with pytest.raises(ValueError, match="hidden has layers"):
        w.append(**{**b, "hidden": {}})
    with pytest.raises(ValueError, match=r"expert ids span .*num_experts=8"):
        w.append(**{**b, "routing": {**b["routing"], 0: (b["routing"][0][0] + 8, b["routing"][0][1])}})
    with pytest.raises(ValueError, match=r"expected both \(4, top_k=2\)"):
        w.append(**{**b, "routing": {**b["routing"], 0: (b["routing"][0][0][:, :1], b["routing"][0][1][:, :1])}})
    with pytest.raises(ValueError, match="T=4 rows"):
        w.append(**{**b, "labels_T": np.zeros(3, dtype=int)})
    with pytest.raises(ValueError, match="labels_T is missing"):
        w.append(**{**b, "labels_T": None})
    w.close()
    with pytest.raises(ValueError, match="max_bytes"):
        TraceReader(tmp_path / "old").load_layer(3, hidden=True, max_bytes=10)
    with pytest.raises(ValueError, match="layer 7 is not in the trace"):
        TraceReader(tmp_path / "old").load_layer(7)
