"""Interventions on routers with variable experts per token (issue #22 x #23): expert choice (its causal
threshold rule at analysis time), ReLU gates and top-k with null experts, on randomised checkpoints saved at EP=2
and captured at EP=2 and at EP=1.

Expert ablation, random routing and layer copy apply and agree across the layouts; ablating every routed expert of
a layer changes the loss (the routers do select tokens); random routing keeps every expert's load per window.
``topk_change`` (expert choice, ReLU) and ``frozen_paths`` (all three) are not applicable, with the reason, and the
run still finishes (a model whose routers no intervention applies to once crashed the capture ranks).

Legend: W windows, S sequence length.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_moe_ext.analysis.capture import CapturePlan
from megatron_moe_ext.analysis.capture import main as capture_main
from megatron_moe_ext.analysis.token_windows import TokenWindows
from megatron_moe_ext.testing import run_distributed
from megatron_moe_ext.testing.random_checkpoint import model_flags, save_random_checkpoint

S = 64
NAMES = ("expert_ablation", "topk_change", "random_routing", "frozen_paths", "layer_copy")
OPTIONS = {"ablate_experts": [[1, 0]], "ablate_top_m": [1], "ablate_layers": [1], "renormalize": False,
           "copy_routing": [[1, 2]], "hurt_tokens": 3}
ROUTERS = {
    "expert_choice": ["--moe-router-type", "expert_choice", "--moe-aux-loss-coeff", "0"],
    "relu": ["--moe-router-type", "relu"],
    "topk_null": ["--moe-null-experts", "2"],
}
APPLIES = ("expert_ablation", "random_routing", "layer_copy")
NOT_APPLICABLE = {
    "expert_choice": {"topk_change": "router type 'expert_choice'", "frozen_paths": "top-1 path is not defined"},
    "relu": {"topk_change": "router type 'relu'", "frozen_paths": "top-1 path is not defined"},
    "topk_null": {"frozen_paths": "null experts in router layers [1, 2]"},
}
LAYOUTS = ((2, 2), (1, 1))  # (ep, nproc): the reference first


def _windows(path: Path) -> None:
    rng = np.random.default_rng(1)
    tokens_WS = rng.integers(32, 127, (4, S)).astype(np.int64)
    labels_WS = np.repeat(np.array([0, 0, 1, 1]), S).reshape(4, S)
    TokenWindows(tokens_WS, np.repeat(np.arange(4), S).reshape(4, S), labels_WS, ("A", "B")).save(str(path))


@pytest.fixture(scope="module", params=sorted(ROUTERS))
def run(request, tmp_path_factory) -> tuple[str, dict]:
    router = request.param
    root = tmp_path_factory.mktemp(f"interventions_{router}")
    ckpt = root / "ckpt"
    flags = model_flags(*ROUTERS[router], "--moe-token-dispatcher-type", "allgather", ep=2)
    run_distributed(save_random_checkpoint, 2, flags, str(ckpt), timeout_s=600)
    _windows(root / "windows.npz")
    results = {}
    for ep, nproc in LAYOUTS:
        trace = root / f"trace-ep{ep}"
        plan = CapturePlan(iter_dir=str(ckpt / "iter_0000001"), windows_file=str(root / "windows.npz"),
                           trace_dir=str(trace), iteration=1, tensor_parallel=1, expert_parallel=ep,
                           micro_batch_size=2, instruments=NAMES, options=OPTIONS)
        plan_file = root / f"plan-ep{ep}.json"
        plan.save(str(plan_file))
        run_distributed(capture_main, nproc, [str(plan_file)], timeout_s=600)
        results[(ep, nproc)] = json.loads((trace / "instruments.json").read_text())
    return router, results


def test_applicable_interventions_agree_at_ep2_and_ep1(run) -> None:
    router, results = run
    ref, other = results[LAYOUTS[0]], results[LAYOUTS[1]]
    for name in APPLIES:
        assert "not_applicable" not in ref[name], (router, name, ref[name])
        a, b = ref[name]["variants"], other[name]["variants"]
        assert [v["name"] for v in a] == [v["name"] for v in b] and a, (router, name)
        for va, vb in zip(a, b):
            assert va["tokens"] == vb["tokens"] == 4 * (S - 1)
            assert vb["loss"] == pytest.approx(va["loss"], rel=1e-6, abs=1e-6), (router, name, va["name"])
            for key in ("load_preserved", "tokens_rerouted_fraction", "experts_by_layer"):
                assert va.get(key) == vb.get(key), (router, name, va["name"], key)


def test_ablation_changes_the_loss_and_random_routing_keeps_the_load(run) -> None:
    router, results = run
    res = results[LAYOUTS[0]]
    whole = next(v for v in res["expert_ablation"]["variants"] if v["name"] == "layer 1: all routed experts")
    assert abs(whole["delta"]) > 1e-4, (router, whole)
    assert all(v["load_preserved"] for v in res["random_routing"]["variants"]), router


def test_the_others_say_why_they_do_not_apply(run) -> None:
    router, results = run
    for layout, res in results.items():
        for name, reason in NOT_APPLICABLE[router].items():
            assert reason in res[name].get("not_applicable", ""), (router, layout, name, res[name])
