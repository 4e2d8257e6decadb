"""Interventions on the demo's architecture: a product-key router (layer 1, 16 fine-grained experts) and a PEER
layer (layer 2), on a randomised checkpoint, captured at EP=2 and at TP=2 with sequence parallelism. What applies
must agree between the layouts; what does not must say why (PEER layers and product-key top-k changes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_moe_ext.analysis.capture import CapturePlan
from megatron_moe_ext.analysis.capture import main as capture_main
from megatron_moe_ext.analysis.interventions import PEER_REASON
from megatron_moe_ext.analysis.token_windows import TokenWindows
from megatron_moe_ext.testing import run_distributed
from megatron_moe_ext.testing.random_checkpoint import model_flags, save_random_checkpoint

DEMO = ("--moe-granularity", "4", "--moe-expansion-rate", "4", "--moe-base-topk", "1",
        "--moe-router-type", "product_key", "--moe-pk-key-dim", "32",
        "--moe-peer-num-experts", "256", "--moe-peer-heads", "4", "--moe-peer-topk", "8",
        "--moe-peer-key-dim", "32", "--moe-peer-layers", "2")
NAMES = ("expert_ablation", "topk_change", "random_routing", "frozen_paths", "layer_copy")
OPTIONS = {"ablate_experts": [[1, 5]], "ablate_top_m": [2], "ablate_layers": [1], "renormalize": True,
           "topk_values": [2], "frozen_paths": [2, 0], "copy_routing": [], "hurt_tokens": 3}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pk_interventions")
    run_distributed(save_random_checkpoint, 2, model_flags(*DEMO, ep=2), str(root / "ckpt"))
    rng = np.random.default_rng(1)
    S = 128
    tokens_WS = rng.integers(0, 256, (5, S))
    labels_WS = np.repeat(np.array([0, 0, 1, 1, 1]), S).reshape(5, S)
    TokenWindows(tokens_WS, np.zeros_like(tokens_WS), labels_WS, ("x", "y")).save(str(root / "windows.npz"))
    out = {}
    for tp, ep in ((1, 2), (2, 1)):
        trace = root / f"trace-{tp}-{ep}"
        plan = CapturePlan(iter_dir=str(root / "ckpt" / "iter_0000001"), windows_file=str(root / "windows.npz"),
                           trace_dir=str(trace), tensor_parallel=tp, expert_parallel=ep, micro_batch_size=2,
                           instruments=NAMES, options=OPTIONS)
        plan.save(str(root / f"plan-{tp}-{ep}.json"))
        run_distributed(capture_main, 2, [str(root / f"plan-{tp}-{ep}.json")])
        out[(tp, ep)] = json.loads((trace / "instruments.json").read_text())
    return out


def test_what_applies_agrees_between_ep2_and_tp2_sp(runs) -> None:
    ep2, tp2 = runs[(1, 2)], runs[(2, 1)]
    for name in ("expert_ablation", "random_routing", "frozen_paths"):
        assert ep2[name]["layers"] == [1] and ep2[name]["not_applicable_layers"] == {"2": PEER_REASON}
        for a, b in zip(ep2[name]["variants"], tp2[name]["variants"], strict=True):
            assert a["name"] == b["name"] and a["tokens"] == b["tokens"] == 5 * 127
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), (name, a["name"])
            assert a.get("experts_by_layer") == b.get("experts_by_layer")
    assert all(v["load_preserved"] for v in ep2["random_routing"]["variants"])
    every = next(v for v in ep2["frozen_paths"]["variants"] if v["name"] == "all observed paths")
    assert every["delta"] == 0.0
    assert any(abs(v["delta"]) > 1e-4 for v in ep2["expert_ablation"]["variants"])  # the hooks did change routing


def test_what_does_not_apply_says_why(runs) -> None:
    for res in runs.values():
        assert "product-key router: its k per head is part of the retrieval layout" in (
            res["topk_change"]["not_applicable"])
        assert "one router layer (1): no other layer's routing to copy" in res["layer_copy"]["not_applicable"]
        assert "PEER layer" in res["layer_copy"]["not_applicable"]
