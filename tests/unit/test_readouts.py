"""Known answers of the readouts' pure parts (issue #23): co-activation of a hand-made trace, probes on data
whose label is (or is not) linearly decodable, the logit lens's linearisation against the norm itself, token
classes, and the refusal of a one-label probe. The rank-side instruments on real Megatron models:
tests/distributed/test_readouts_parallel.py."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from megatron_moe_ext.analysis import coactivation, logit_lens, probes
from megatron_moe_ext.analysis.token_text import TOKEN_CLASSES, byte_token_text, token_class
from megatron_moe_ext.analysis.trace_format import LayerSpec, TraceReader, TraceWriter


# -- co-activation -----------------------------------------------------------------------------------------------
def _hand_trace(path) -> None:
    """Layer 1 (4 experts, top-2): 60 tokens pick {0, 1}, 30 pick {2, 3}, 10 pick {0, 2}.
    Layer 2 (3 experts, top-1): expert 0 after {0, 1}, expert 1 after {2, 3}, expert 2 after {0, 2}."""
    ids1 = np.array([[0, 1]] * 60 + [[3, 2]] * 30 + [[2, 0]] * 10)
    ids2 = np.array([[0]] * 60 + [[1]] * 30 + [[2]] * 10)
    T = ids1.shape[0]
    with TraceWriter(path, [LayerSpec(1, 4, 2), LayerSpec(2, 3, 1)], chunk_tokens=32) as w:  # several chunks
        w.append(np.arange(T), np.arange(T), np.zeros(T, np.int64),
                 {1: (ids1, np.full(ids1.shape, 0.5)), 2: (ids2, np.ones(ids2.shape))})


def test_coactivation_of_a_hand_made_trace(tmp_path) -> None:
    _hand_trace(tmp_path / "t")
    result = coactivation.coactivation_readout(TraceReader(tmp_path / "t"))
    json.dumps(result, allow_nan=False)
    (l1,) = [x for x in result["layers"] if x["layer"] == 1]
    p = np.array(l1["p_j_given_i"], dtype=float)  # shown experts 0..3 (all of them)
    assert l1["shown_experts"] == [0, 1, 2, 3]
    # n_0 = 70 (60 with 1, 10 with 2): P(1|0) = 60/70, P(2|0) = 10/70; n_1 = 60: P(0|1) = 1.
    assert p[0, 1] == pytest.approx(60 / 70) and p[0, 2] == pytest.approx(10 / 70) and p[0, 3] == 0
    assert p[1, 0] == 1.0 and p[3, 2] == 1.0 and p[2, 3] == pytest.approx(30 / 40)
    assert p[0, 0] == 1.0  # the diagonal is n_i / n_i
    best = l1["top_pairs"][0]  # lift: P(3|2) = 30/40 over P(3) = 30/100 -> 2.5 ties (2|3) 1/0.4; (1|0) 60/70/0.6
    lifts = {(x["i"], x["j"]): x["lift"] for x in l1["top_pairs"]}
    assert lifts[(3, 2)] == pytest.approx(1.0 / 0.4) and lifts[(2, 3)] == pytest.approx(0.75 / 0.3)
    assert lifts[(1, 0)] == pytest.approx(1.0 / 0.7) and lifts[(0, 1)] == pytest.approx((60 / 70) / 0.6)
    assert (best["i"], best["j"]) in {(3, 2), (2, 3)} and best["lift"] == pytest.approx(2.5)
    (ac,) = result["across"]
    q = np.array(ac["p_j_given_i"], dtype=float)  # P(j in 2 | i in 1), shown 0..3 x 0..2
    assert q[0].tolist() == pytest.approx([60 / 70, 0, 10 / 70])
    assert q[1].tolist() == pytest.approx([1, 0, 0]) and q[3].tolist() == pytest.approx([0, 1, 0])
    assert q[2].tolist() == pytest.approx([0, 0.75, 0.25])
    md = coactivation.report_section(result, str(tmp_path / "figures"))
    assert "figures/coactivation.png" in md and "| 3 | 2 | 30 | 1.000 | 0.400 | 2.50 |" in md
    png = (tmp_path / "figures" / "coactivation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and min(struct.unpack(">II", png[16:24])) >= 300


def test_pair_counts_count_each_expert_once_per_token() -> None:
    ids = coactivation.selection_sets(np.array([[1, 1, 2], [0, 2, 2]]))  # two heads picked the same expert
    n = coactivation.pair_counts(ids, ids, 3, 3)
    assert np.diag(n).tolist() == [1, 1, 2] and n[1, 2] == n[2, 1] == 1 and n[0, 2] == 1 and n[0, 1] == 0


def test_coactivation_counts_null_experts_and_skips_empty_slots(tmp_path) -> None:
    """Trace v2: 3 real + 1 null expert (id 3), rows padded with -1 (variable experts per token). 40 tokens pick
    {0, 3 (null)}, 20 pick {1} alone, 10 pick {0, 1}: n_0 = 50, n_3 = 40, P(3 | 0) = 40/50, P(0 | 1) = 10/30."""
    ids = np.array([[0, 3]] * 40 + [[1, -1]] * 20 + [[1, 0]] * 10)
    T = ids.shape[0]
    with TraceWriter(tmp_path / "t", [LayerSpec(1, 3, 2, null_experts=1, variable=True)]) as w:
        w.append(np.arange(T), np.arange(T), np.zeros(T, np.int64), {1: (ids, np.where(ids >= 0, 0.5, 0.0))})
    result = coactivation.coactivation_readout(TraceReader(tmp_path / "t"))
    (l1,) = result["layers"]
    assert l1["null_experts"] == 1 and l1["shown_experts"] == [0, 1, 2, 3]
    p = np.array(l1["p_j_given_i"], dtype=float)
    assert p[0, 3] == pytest.approx(40 / 50) and p[3, 0] == 1.0 and p[1, 0] == pytest.approx(10 / 30)
    assert np.isnan(p[2, 2])  # expert 2: never selected
    assert "(3 experts + 1 null (ids from 3), top-2, 70 tokens)" in coactivation.report_section(
        result, str(tmp_path / "f"))


def test_coactivation_refuses_huge_layers(tmp_path) -> None:
    with TraceWriter(tmp_path / "t", [LayerSpec(1, 4096, 2)]) as w:
        w.append(np.arange(3), np.arange(3), np.zeros(3, np.int64), {1: (np.array([[0, 1]] * 3), np.ones((3, 2)))})
    result = coactivation.coactivation_readout(TraceReader(tmp_path / "t"))
    assert "4096 experts > 1024" in result["not_applicable"]
    assert "Not applicable" in coactivation.report_section(result, str(tmp_path / "f"))


# -- probes ------------------------------------------------------------------------------------------------------
def test_probe_reads_a_linear_label_and_the_control_does_not() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 900)
    x = 0.3 * rng.normal(size=(900, 8))
    x[:, 2] += 4.0 * (y == 1)  # each class has its own direction, far beyond the noise: separable
    x[:, 5] += 4.0 * (y == 2)
    train = np.arange(900) % 4 != 0
    r = probes.fit_probe(x, y, train, seed=1)
    assert r.accuracy == 1.0 and r.train_accuracy == 1.0
    assert abs(r.control_accuracy - 1 / 3) < 0.1  # shuffled labels: chance on held-out tokens
    assert r.majority_accuracy == pytest.approx(np.mean(y[~train] == np.bincount(y[train]).argmax()))
    noise = probes.fit_probe(rng.normal(size=(900, 8)), y, train, seed=1)  # features carry no label
    assert abs(noise.accuracy - 1 / 3) < 0.1 and abs(noise.selectivity) < 0.15


def test_probe_split_and_sample_are_layout_independent() -> None:
    keys = np.arange(1000)
    u = probes.uniform_hash(3, keys)
    assert np.array_equal(u, np.concatenate([probes.uniform_hash(3, keys[:300]), probes.uniform_hash(3, keys[300:])]))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.05
    assert not np.array_equal(u, probes.uniform_hash(4, keys))
    kept = probes.smallest_u(u, keys, 100)
    perm = np.random.default_rng(0).permutation(1000)  # rows in another order: the same tokens, key order
    assert np.array_equal(keys[kept], keys[perm][probes.smallest_u(u[perm], keys[perm], 100)])
    assert np.all(np.diff(keys[kept]) > 0) and set(keys[kept]) == set(np.argsort(u)[:100])


def test_one_label_probe_is_refused_naming_the_fix() -> None:
    with pytest.raises(ValueError, match=r"at least 2 labels, the data has 1 \(web\).*fix: pass two or more"):
        probes.check_probe_labels({"web": 100, "code": 0})
    with pytest.raises(ValueError, match="has 0"):
        probes.check_probe_labels([])
    probes.check_probe_labels([3, 4])
    with pytest.raises(ValueError, match=r"--probe-test-fraction 1.5.*fix"):
        probes.check_options({"probe_test_fraction": 1.5})
    with pytest.raises(ValueError, match=r"--probe-max-tokens 0.*fix"):
        probes.check_options({"probe_max_tokens": 0})
    with pytest.raises(ValueError, match=r"--logit-lens-top-tokens 0.*fix"):
        logit_lens.check_options({"logit_lens_top_tokens": 0})


# -- logit lens linearisation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
def test_direct_logit_attribution_is_the_norms_derivative(kind: str) -> None:
    """With sigma_t frozen, the norm is linear: dla(c) equals the change of W_U N(r + c) with N's scale held at
    r's; and for a small c it is the first-order change of the real norm."""
    torch.manual_seed(0)
    H, V = 16, 11
    r_TH, c_TH = torch.randn(5, H, dtype=torch.float64), torch.randn(5, H, dtype=torch.float64)
    g_H, W_VH = 1 + 0.2 * torch.randn(H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    eps = 1e-5
    norm = (torch.nn.RMSNorm(H, eps=eps) if kind == "RMSNorm" else torch.nn.LayerNorm(H, eps=eps)).double()
    with torch.no_grad():
        norm.weight.copy_(g_H)
        if kind == "LayerNorm":
            norm.bias.zero_()
    sigma_T = logit_lens.norm_scale(r_TH, kind=kind, eps=eps)
    v_TH = logit_lens.normalised_contribution(c_TH, sigma_T, centre=kind == "LayerNorm")
    dla_TV = logit_lens.direct_logits(v_TH, gamma_H=g_H, unembed_VH=W_VH)
    with torch.no_grad():
        ref_TV = norm(r_TH) @ W_VH.T  # the real norm gives back r's logits: sigma is right
        frozen = (r_TH + c_TH - ((r_TH + c_TH).mean(-1, keepdim=True) if kind == "LayerNorm" else 0))
        frozen_TV = (g_H * frozen / sigma_T[:, None]) @ W_VH.T
        base = (g_H * (r_TH - (r_TH.mean(-1, keepdim=True) if kind == "LayerNorm" else 0)) / sigma_T[:, None]) @ W_VH.T
        assert torch.allclose(base, ref_TV, atol=1e-9)
        assert torch.allclose(dla_TV, frozen_TV - base, atol=1e-9)
        small = 1e-6 * c_TH  # the real norm's first-order change differs by the sigma term only
        jvp = torch.func.jvp(lambda r: norm(r) @ W_VH.T, (r_TH,), (c_TH,))[1]
        sigma_term = jvp - dla_TV
        assert torch.allclose((norm(r_TH + small) @ W_VH.T - ref_TV) / 1e-6, jvp, atol=1e-4)
        assert sigma_term.abs().max() > 0  # the linearisation drops exactly that term


def test_top_entries_and_token_classes() -> None:
    up, down = logit_lens.top_entries(np.array([0.5, 3.0, -2.0, 3.0, 0.0]), 2)
    assert up.tolist() == [1, 3] and down.tolist() == [2, 4]
    names = [TOKEN_CLASSES[token_class(byte_token_text(i, 255))] for i in (ord(" "), ord("7"), ord("q"), ord(";"))]
    assert names == ["whitespace", "digit", "alpha", "punct"]
    assert TOKEN_CLASSES[token_class(byte_token_text(200, 255))] == "other"
    assert byte_token_text(255, 255) == "<eod>" and TOKEN_CLASSES[token_class("<eod>")] == "other"
    assert TOKEN_CLASSES[token_class("Hello")] == "alpha" and TOKEN_CLASSES[token_class(" 12")] == "digit"
