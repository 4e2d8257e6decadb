"""The pure parts of the interventions (analysis/interventions*.py): option checks against a model's facts, the
random-routing permutation, the loss effects and the most-hurt tokens, each against answers computed here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_moe_ext.analysis.interventions import (
    ablated_gates,
    hurt_tokens,
    loss_effects,
    permute_window_rows,
    window_permutation,
)
from megatron_moe_ext.analysis.interventions_options import (
    ALL_PATHS,
    InterventionOptions,
    ModelFacts,
    build_intervention_options,
)

FACTS = ModelFacts(layers={1: "moe", 2: "moe", 3: "peer"}, num_experts=8, topk=2, router_type="topk")


def _build(names=("expert_ablation",), **kw):
    return build_intervention_options(names=names, facts=FACTS, **kw)


def test_options_parse_and_round_trip_through_json() -> None:
    o = _build(("expert_ablation", "frozen_paths", "layer_copy", "topk_change"), ablate_experts="1:0,2:7",
               ablate_top_m="2", frozen_paths="1,4,all", copy_routing="2:1", topk_values="1,4", renormalize=True)
    assert o.ablate_experts == ((1, 0), (2, 7)) and o.ablate_top_m == (2,) and o.renormalize
    assert o.frozen_paths == (1, 4, ALL_PATHS) and o.copy_routing == ((2, 1),) and o.topk_values == (1, 4)
    assert InterventionOptions.from_dict(o.as_dict()) == o


def test_defaults_fill_in_for_asked_interventions() -> None:
    o = _build(("expert_ablation", "topk_change", "frozen_paths", "layer_copy"))
    assert o.ablate_layers == (1, 2) and o.ablate_top_m == (1,)  # PEER layer 3 is not a router layer
    assert o.topk_values == (1, 4) and o.frozen_paths == (1, 4, 16, ALL_PATHS) and o.copy_routing == ((1, 2),)
    assert _build(("random_routing",)) == InterventionOptions()


@pytest.mark.parametrize("kw, message", [
    ({"ablate_experts": "4:0"}, "no router in layer 4"),
    ({"ablate_experts": "3:0"}, "layer 3 is a PEER layer"),
    ({"ablate_experts": "1:8"}, "layer 1 has experts 0..7"),
    ({"ablate_experts": "1"}, "is not A:B"),
    ({"ablate_top_m": "8"}, "must be in 1..7"),
    ({"ablate_top_m": "x"}, "'x' is not an integer"),
    ({"ablate_layers": "0"}, "no router in layer 0"),
    ({"hurt_tokens": -1}, "--hurt-tokens -1"),
])
def test_bad_ablation_options_name_value_and_fix(kw, message) -> None:
    with pytest.raises(ValueError, match="fix:|must be") as err:
        _build(**kw)
    assert message in str(err.value)


def test_options_need_their_intervention() -> None:
    with pytest.raises(ValueError, match="--copy-routing given without the layer_copy intervention; fix"):
        _build(("expert_ablation",), copy_routing="1:2")
    with pytest.raises(ValueError, match="onto itself"):
        _build(("layer_copy",), copy_routing="1:1")
    with pytest.raises(ValueError, match=r"--topk-values 9: must be in 1..8"):
        _build(("topk_change",), topk_values="9")


def test_window_permutation_keeps_each_windows_load_and_ignores_the_batch() -> None:
    S, N = 16, 5
    gen = torch.Generator().manual_seed(0)
    ids_SB2 = torch.stack([torch.randperm(N, generator=gen)[:2] for _ in range(S * 3)]).reshape(S, 3, 2)
    map_SBN = torch.zeros(S, 3, N, dtype=torch.bool).scatter_(2, ids_SB2, True)
    probs_SBN = torch.rand(S, 3, N, generator=gen) * map_SBN
    windows = np.array([7, 2, 9])
    new_map = permute_window_rows(map_SBN, windows, seed=1, layer=2)
    new_probs = permute_window_rows(probs_SBN, windows, seed=1, layer=2)
    assert torch.equal(new_map.sum(dim=0), map_SBN.sum(dim=0))  # every expert's load in every window
    assert torch.equal(new_map.sum(dim=-1), map_SBN.sum(dim=-1))  # every token keeps k
    assert torch.equal(new_probs != 0, new_map)  # gates travel with their selections
    assert not torch.equal(new_map, map_SBN)
    for b, w in enumerate(windows):  # the rows of window w, in the order its own permutation gives
        perm = window_permutation(1, int(w), 2, S)
        assert torch.equal(new_probs[:, b], probs_SBN[perm, b])
    # The same window alone in a batch (another layout) gets the same permutation.
    alone = permute_window_rows(probs_SBN[:, 1:2], windows[1:2], seed=1, layer=2)
    assert torch.equal(alone[:, 0], new_probs[:, 1])
    assert not np.array_equal(window_permutation(1, 7, 1, S), window_permutation(1, 7, 2, S))


def test_loss_effects_known_answer() -> None:
    clean_WS = np.array([[1.0, 2.0, 9.0], [3.0, 1.0, 9.0]])
    loss_WS = np.array([[2.0, 2.0, 0.0], [3.0, 4.0, 0.0]])
    mask_WS = np.array([[True, True, False], [True, True, False]])
    labels_WS = np.array([[0, 0, 0], [1, 1, 1]])
    out = loss_effects(clean_WS, loss_WS, mask_WS, labels_WS, ("a", "b"))
    assert out["tokens"] == 4 and out["clean"] == pytest.approx(7 / 4) and out["loss"] == pytest.approx(11 / 4)
    assert out["delta"] == pytest.approx(1.0)
    # per-window mean deltas 0.5 and 1.5: std (ddof 1) sqrt(0.5), over sqrt(2) windows
    assert out["delta_se"] == pytest.approx(np.sqrt(0.5) / np.sqrt(2))
    assert out["per_label"]["a"] == {"tokens": 2, "loss": 2.0, "clean": 1.5, "delta": 0.5}
    assert out["per_label"]["b"]["delta"] == pytest.approx(1.5)
    records = {"mask": mask_WS, "clean": clean_WS, "labels": labels_WS, "windows": np.array([4, 5]),
               "tokens": np.array([[10, 11, 12], [20, 21, 22]])}
    hurt = hurt_tokens(records, loss_WS, ("a", "b"), 2)
    assert [(t["window"], t["position"], t["token"], t["next_token"], t["delta"]) for t in hurt] == [
        (5, 1, 21, 22, 3.0), (4, 0, 10, 11, 1.0)]


def test_ablated_gates_drop_or_renormalize() -> None:
    probs_TN = torch.tensor([[0.6, 0.0, 0.4, 0.0], [0.0, 0.7, 0.0, 0.3], [0.5, 0.0, 0.0, 0.0]])
    dropped = ablated_gates(probs_TN, [0], renormalize=False)
    assert torch.equal(dropped, torch.tensor([[0.0, 0.0, 0.4, 0.0], [0.0, 0.7, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]]))
    renorm = ablated_gates(probs_TN, [0], renormalize=True)
    assert torch.allclose(renorm, torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.7, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(ablated_gates(probs_TN, [0, 1, 2, 3], renormalize=True), torch.zeros(3, 4))
