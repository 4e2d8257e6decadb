"""The balance losses and metrics wired into Megatron's routers, checked against the pure functions.

- Router level (2 gloo ranks, EP=2, so the device and communication losses apply): each loss,
  attached through Megatron's MoEAuxLossAutoScaler, adds exactly the gradient of the pure function
  (``balancing/losses.py``) to the router's parameters, and its logged value is the pure value /
  coeff; at perfect balance (a router rigged to balanced routing) every loss logs 1 (value = coeff);
  the device loss equals the expert loss when each EP rank holds one expert; the product-key router's
  subkey loss; the step metrics equal ``balancing/metrics.py`` and reach Megatron's tracker report.
- Through Megatron's schedule (the parity harness of test_parity.py): the global-batch loss with
  DP=2 and 2 micro-batches gives the loss, the logged value and every gradient of one rank seeing
  the whole batch; Megatron's own global_aux_loss gets the router gradient 1/DP too small.
"""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext.testing import run_distributed
from test_parity import BATCHES, assert_parity, parallel_step, reference_step

HIDDEN = 32
S, B = 8, 3  # tokens [S, B]
COEFF = 0.1
DENSE_LOSSES = ("expert", "sequence", "device", "communication")


def _init(ep: int = 2) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_moe_ext.testing.tiny import initialize_parallel

    if not ps.model_parallel_is_initialized():
        initialize_parallel(ep=ep)
    # The schedule sets this per micro-batch; a bare router forward/backward uses 1.
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))


def _pg():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def _config(**overrides):
    from megatron_moe_ext.testing.tiny import tiny_config

    values = dict(num_moe_experts=4, moe_router_topk=2, expert_model_parallel_size=2)
    values.update(overrides)
    return tiny_config(**values)


def _tracked() -> dict[str, list[float]]:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    values = {name: entry.values.tolist() for name, entry in tracker.metrics.items()}
    tracker.clear()
    return values


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [S, B, h] (this rank's tokens), padding [S, B] (True = padding), valid_T [S*B]."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(seed + 100 * dist.get_rank())
    x = torch.randn(S, B, HIDDEN, generator=gen)
    padding = torch.zeros(S, B, dtype=torch.bool)
    padding[-3:, 1] = True
    return x, padding, ~padding.reshape(-1)


def _pure_dense_loss(kind: str, scores_TN, map_TN, valid_T, topk: int = 2):
    from megatron_moe_ext.balancing import losses as L

    n_valid = int(valid_T.sum())
    counts_N = L.expert_counts(map_TN, valid_T=valid_T)
    N = scores_TN.shape[1]
    if kind == "expert":
        return L.expert_balance_loss(scores_TN, counts_N, n_valid, topk, COEFF, valid_T=valid_T)
    if kind == "device":
        return L.device_balance_loss(scores_TN, counts_N, n_valid, topk, 2, COEFF, valid_T=valid_T)
    if kind == "communication":
        return L.communication_balance_loss(scores_TN, map_TN, 2, COEFF, valid_T=valid_T)
    valid_SB = valid_T.view(S, B)
    counts_BN = L.sequence_counts(map_TN.view(S, B, N), valid_SB=valid_SB)
    return L.sequence_balance_loss(scores_TN.view(S, B, N), counts_BN, topk, COEFF, valid_SB=valid_SB)


def dense_loss_case(kind: str, seed: int) -> dict:
    """BalancedTopKRouter with one loss vs Megatron's TopKRouter with the same weight."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_ext.settings.balancing import LOSS_LOG_NAMES
    from megatron_moe_ext.layers.balanced_router import BalancedTopKRouter

    torch.manual_seed(seed)
    router = BalancedTopKRouter(_config(moe_balance_losses=[kind], moe_balance_coeffs=[COEFF]), pg_collection=_pg())
    plain = TopKRouter(_config(), pg_collection=_pg())
    for r in (router, plain):
        r.set_layer_number(1)
    with torch.no_grad():
        plain.weight.copy_(router.weight)
    x, padding, valid_T = _inputs(seed)
    # No gradient from the routing outputs: what reaches the weight is the balance loss's alone
    # (a difference of two large gradients would lose it to fp32 cancellation).
    grad_out = torch.zeros(S * B, 4)
    out = {}
    for name, r in (("balanced", router), ("plain", plain)):
        probs, routing_map = r(x, padding_mask=padding)
        (probs * grad_out).sum().backward()
        out[name] = {"probs": probs.detach(), "map": routing_map}
    logged = _tracked()[LOSS_LOG_NAMES[kind]][0]
    # The pure function on Megatron's aux-loss scores, differentiated w.r.t. the router weight.
    W = router.weight.detach().clone().requires_grad_(True)
    scores_TN = torch.softmax(x.reshape(-1, HIDDEN) @ W.t(), dim=-1)
    map_TN = torch.zeros_like(scores_TN, dtype=torch.bool).scatter(1, scores_TN.topk(2, dim=-1).indices, True)
    loss = _pure_dense_loss(kind, scores_TN, map_TN, valid_T)
    (ref_grad,) = torch.autograd.grad(loss, W)
    return {
        "probs_equal": torch.equal(out["balanced"]["probs"], out["plain"]["probs"]),
        "map_equal": torch.equal(out["balanced"]["map"], out["plain"]["map"]),
        "grad_added": router.weight.grad - plain.weight.grad,
        "ref_grad": ref_grad,
        "logged_times_coeff": logged * COEFF,
        "pure": float(loss),
    }


class RiggedRouter:
    """Mixin for a real router subclass: adds ``rig_SN`` (a large boost per position and expert) to
    the gate logits, forcing the routing while keeping the graph to the router weight."""

    rig_SN: torch.Tensor | None = None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        logits = super().gating(input)
        return logits if self.rig_SN is None else logits + self.rig_SN[: input.shape[0]].unsqueeze(1)


def _rigged_class():
    from megatron_moe_ext.layers.balanced_router import BalancedTopKRouter

    return type("RiggedBalancedTopKRouter", (RiggedRouter, BalancedTopKRouter), {})


def _prefer(experts_per_position: list[tuple[int, ...]], N: int = 4) -> torch.Tensor:
    rig = torch.zeros(len(experts_per_position), N)
    for s, experts in enumerate(experts_per_position):
        rig[s, list(experts)] = 20.0
    return rig


def perfect_balance_case() -> dict:
    """Position s goes to experts {s%2, s%2+2}: every expert, sequence and EP rank gets the same load
    and every token reaches both EP ranks, so every loss is exactly its coefficient."""
    kinds = ["expert", "global_expert", "sequence", "device", "communication"]
    torch.manual_seed(3)
    router = _rigged_class()(_config(moe_balance_losses=kinds, moe_balance_coeffs=[COEFF] * 5), pg_collection=_pg())
    router.set_layer_number(1)
    router.rig_SN = _prefer([(s % 2, s % 2 + 2) for s in range(S)])
    x = torch.randn(S, B, HIDDEN)
    probs, routing_map = router(x)
    probs.sum().backward()
    router.reset_balancing_step()
    return {"tracked": _tracked(), "loads": routing_map.sum(0)}


def device_equals_expert_case() -> dict:
    """N = EP = 2, top-1: each EP rank holds one expert, so the device loss is the expert loss."""
    from megatron_moe_ext.layers.balanced_router import BalancedTopKRouter

    out = {}
    x, padding, _ = _inputs(5)
    grad_out = torch.randn(S * B, 2)
    for kind in ("expert", "device"):
        torch.manual_seed(4)
        config = _config(num_moe_experts=2, moe_router_topk=1, moe_router_pre_softmax=True,
                         moe_balance_losses=[kind], moe_balance_coeffs=[COEFF])
        router = BalancedTopKRouter(config, pg_collection=_pg())
        router.set_layer_number(1)
        probs, _ = router(x, padding_mask=padding)
        (probs * grad_out).sum().backward()
        out[kind] = {"grad": router.weight.grad.clone(), "logged": _tracked()[f"{kind}_balance_loss"][0]}
    return out


def product_key_case() -> dict:
    """ProductKeyRouter with the subkey and expert losses vs the same router without them."""
    from megatron_moe_ext.balancing import losses as L
    from megatron_moe_ext.layers.product_key_router import ProductKeyRouter, product_key_full_scores

    pk = dict(num_moe_experts=16, moe_router_type="product_key", moe_pk_key_dim=8, moe_pk_query_norm="none")
    torch.manual_seed(6)
    config = _config(**pk, moe_balance_losses=["subkey", "expert"], moe_balance_coeffs=[COEFF, 2 * COEFF])
    router = ProductKeyRouter(config, pg_collection=_pg())
    plain = ProductKeyRouter(_config(**pk), pg_collection=_pg())
    plain.load_state_dict(router.state_dict())
    for r in (router, plain):
        r.set_layer_number(1)
    x, padding, valid_T = _inputs(7)
    grad_out = torch.zeros(S * B, 16)  # only the balance losses reach the parameters
    for r in (router, plain):
        probs, _ = r(x, padding_mask=padding)
        (probs * grad_out).sum().backward()
    tracked = _tracked()
    params = [router.query_weight, router.row_keys, router.col_keys]
    a, b = router.half_scores(x.reshape(-1, HIDDEN), valid_T)
    _, ids_TK = router.select(a, b)
    local_THk = (ids_TK % 16).view(-1, 1, 2)
    n_valid = int(valid_T.sum())
    rows, cols = L.subkey_counts(local_THk, 4, 4, valid_T=valid_T)
    subkey = L.subkey_marginal_loss(a, b, rows, cols, n_valid, 2, COEFF, valid_T=valid_T)
    map_TN = torch.zeros(len(ids_TK), 16, dtype=torch.bool).scatter(1, ids_TK, True)
    expert = L.expert_balance_loss(
        product_key_full_scores(a, b, "softmax"), L.expert_counts(map_TN, valid_T=valid_T), n_valid, 2, 2 * COEFF,
        valid_T=valid_T,
    )
    ref_grads = torch.autograd.grad(subkey + expert, params)
    added = [p.grad - q.grad for p, q in zip(params, [plain.query_weight, plain.row_keys, plain.col_keys])]
    return {
        "added": added, "ref": list(ref_grads),
        "subkey": (tracked["subkey_balance_loss"][0] * COEFF, float(subkey)),
        "expert": (tracked["expert_balance_loss"][0] * 2 * COEFF, float(expert)),
    }


def metrics_case() -> dict:
    """Three steps of a rigged router (experts {0,1}, then {2,3} twice), window 2, then the report."""
    import torch.distributed as dist

    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron_moe_ext.balancing.bias_update import finish_balancing_step
    from megatron_moe_ext.integration import install
    from megatron_moe_ext.integration.metrics_logging import installed_names, set_balance_names

    config = _config(moe_balance_metrics=True, moe_balance_usage_window=2,
                     moe_balance_losses=["expert", "global_expert"], moe_balance_coeffs=[COEFF, COEFF])
    router = _rigged_class()(config, pg_collection=_pg())
    router.set_layer_number(2)
    x, padding, valid_T = _inputs(9)
    steps = []
    for step, rig in enumerate([[(0, 1)], [(2, 3)], [(2, 3)]]):
        # Rank 1 puts half its positions elsewhere, so the all-reduced load is uneven.
        prefs = rig * S if dist.get_rank() == 0 else [rig[0] if s % 2 else (0, 2) for s in range(S)]
        router.rig_SN = _prefer(prefs)
        micro_batches = 2
        local = torch.zeros(4, dtype=torch.long)
        for _ in range(micro_batches):
            probs, routing_map = router(x, padding_mask=padding)
            probs.sum().backward()
            local += (routing_map & valid_T.unsqueeze(-1)).sum(0)
        accumulated = int(router.global_balance_counts[-1])  # tokens of the step's micro-batches, all ranks
        finish_balancing_step([router])
        tracked = _tracked()
        dist.all_reduce(local)
        steps.append({"counts": local, "tracked": {k: v[1] / micro_batches for k, v in tracked.items()},
                      "accumulated": accumulated, "after_reset": int(router.global_balance_counts.abs().sum())})
    # Megatron's training_log reports a fixed list; ours must be appended (and installing twice is harmless).
    install(("training",), only=("balance-logging",))
    install(("training",), only=("balance-logging",))  # idempotent
    set_balance_names(config.ext.balance.tracked_names)
    for _ in range(2):
        probs, _ = router(x, padding_mask=padding)
        probs.sum().backward()
    finish_balancing_step([router])
    total_loss_dict: dict = {}
    log = get_moe_metrics_tracker().report(
        loss_scale=1 / 2, iteration=4, force_initialize=True, track_names=["load_balancing_loss", "z_loss"],
        num_layers=config.num_layers, moe_layer_freq=[0, 1], total_loss_dict=total_loss_dict,
    )
    return {"steps": steps, "log": log, "loss_dict": {k: float(v) for k, v in total_loss_dict.items()},
            "names": installed_names()}


def noisy_case() -> dict:
    from megatron_moe_ext.layers.balanced_router import BalancedNoisyTopKRouter
    from megatron_moe_ext.specs import router_class

    config = _config(moe_router_noisy_gating=True, moe_balance_losses=["expert"], moe_balance_coeffs=[COEFF])
    router = router_class(config)(config, pg_collection=_pg())
    router.set_layer_number(1)
    probs, _ = router(torch.randn(S, B, HIDDEN))
    probs.sum().backward()
    return {"cls": type(router) is BalancedNoisyTopKRouter, "noise_grad": float(router.noise_weight.grad.norm()),
            "logged": _tracked()["expert_balance_loss"][0]}


def all_router_cases() -> dict:
    _init()
    out = {f"dense_{kind}": dense_loss_case(kind, seed=i) for i, kind in enumerate(DENSE_LOSSES)}
    out["perfect"] = perfect_balance_case()
    out["device_vs_expert"] = device_equals_expert_case()
    out["product_key"] = product_key_case()
    out["noisy"] = noisy_case()
    out["metrics"] = metrics_case()
    return out


@pytest.fixture(scope="module")
def router_results() -> list[dict]:
    return run_distributed(all_router_cases, 2)


@pytest.mark.world_size(2)
@pytest.mark.parametrize("kind", DENSE_LOSSES)
def test_each_loss_adds_its_pure_gradient_and_logs_its_value(kind: str, router_results) -> None:
    for rank, results in enumerate(router_results):
        got = results[f"dense_{kind}"]
        assert got["probs_equal"] and got["map_equal"], "a balance loss must not change the routing"
        assert got["grad_added"].abs().max() > 0, f"rank {rank}: the {kind} loss is not in the graph"
        torch.testing.assert_close(got["grad_added"], got["ref_grad"], rtol=1e-4, atol=1e-8)
        assert got["logged_times_coeff"] == pytest.approx(got["pure"], rel=1e-5)


@pytest.mark.world_size(2)
def test_every_loss_equals_its_coefficient_at_perfect_balance(router_results) -> None:
    for results in router_results:
        got = results["perfect"]
        assert torch.equal(got["loads"], torch.full((4,), S * B // 2)), got["loads"]
        for name in ("expert_balance_loss", "global_expert_balance_loss", "seq_balance_loss",
                     "device_balance_loss", "comm_balance_loss"):
            # Logged value = loss / coeff: 1 means the loss equals its coefficient.
            assert got["tracked"][name][0] == pytest.approx(1.0, rel=1e-6), name


@pytest.mark.world_size(2)
def test_device_loss_equals_expert_loss_with_one_expert_per_ep_rank(router_results) -> None:
    for results in router_results:
        got = results["device_vs_expert"]
        assert got["device"]["logged"] == pytest.approx(got["expert"]["logged"], rel=1e-6)
        torch.testing.assert_close(got["device"]["grad"], got["expert"]["grad"], rtol=1e-6, atol=1e-9)


@pytest.mark.world_size(2)
def test_product_key_subkey_and_expert_losses(router_results) -> None:
    for results in router_results:
        got = results["product_key"]
        for added, ref in zip(got["added"], got["ref"]):
            assert added.abs().max() > 0
            torch.testing.assert_close(added, ref, rtol=1e-4, atol=1e-8)
        for name in ("subkey", "expert"):
            assert got[name][0] == pytest.approx(got[name][1], rel=1e-5), name


@pytest.mark.world_size(2)
def test_noisy_router_composes_with_balancing(router_results) -> None:
    got = router_results[0]["noisy"]
    assert got["cls"] and got["noise_grad"] > 0 and got["logged"] > 0


@pytest.mark.world_size(2)
def test_step_metrics_equal_pure_metrics_and_reach_megatrons_report(router_results) -> None:
    from megatron_moe_ext.balancing import metrics as M

    steps = [r["metrics"]["steps"] for r in router_results]
    used = torch.zeros(4, dtype=torch.bool)
    history = []
    for i, step in enumerate(steps[0]):
        counts = step["counts"]
        assert all(torch.equal(s[i]["counts"], counts) for s in steps)
        history.append(counts > 0)
        used = torch.stack(history[-2:]).any(0)  # window of 2 steps
        expected = {
            "max_violation": M.max_violation(counts),
            "load_entropy": M.load_entropy(counts),
            "max_violation_ep_rank_max": float(M.max_violation_per_rank(counts, 2).nan_to_num(0).max()),
            "device_max_violation": M.device_max_violation(counts, 2),
            "experts_used_fraction": float(used.float().mean()),
        }
        for rank_steps in steps:
            tracked = rank_steps[i]["tracked"]
            assert set(tracked) >= set(expected), sorted(tracked)
            for name, value in expected.items():
                assert tracked[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (i, name)
    # Step 3: expert 1, last used at step 1, has left the 2-step window.
    assert [float(s["tracked"]["experts_used_fraction"]) for s in steps[0]] == [0.75, 1.0, 0.75]
    got = router_results[0]["metrics"]
    for name in ("max_violation", "max_violation_ep_rank_max", "device_max_violation", "load_entropy",
                 "experts_used_fraction"):
        assert f" {name}: " in got["log"], got["log"]
    # Reported as recorded, despite Megatron's 1/num_microbatches (2 here): the 4th step repeats the 3rd.
    assert " experts_used_fraction: 0.75 |" in got["log"], got["log"]
    assert f" max_violation: {steps[0][2]['tracked']['max_violation']:.2f} |" in got["log"], got["log"]
    # The global-batch counts covered both micro-batches of both ranks, and were reset at the step's end.
    for rank_steps in steps:
        assert all(s["accumulated"] == 2 * 2 * (S * B - 3) and s["after_reset"] == 0 for s in rank_steps)
    assert "expert_balance_loss" in got["loss_dict"] and got["loss_dict"]["expert_balance_loss"] > 0
    assert got["names"][0] == "expert_balance_loss" and "pk_rows_used" not in got["names"]


# ---------------------------------------------------------------------------------------------
# Through Megatron's schedule: global-batch loss at DP=2 with 2 micro-batches vs one rank; TP=2+SP
# ---------------------------------------------------------------------------------------------

# name: (overrides, parallel layout, layout-only overrides of the parallel run)
ONES = [1.0, 1.0, 1.0]
SCHEDULE_CASES = {
    "none": ({}, {"ep": 2}, {}),
    "ours": ({"moe_balance_losses": ["global_expert"], "moe_balance_coeffs": [1.0]}, {"ep": 2}, {}),
    "megatron": ({"moe_router_load_balancing_type": "global_aux_loss", "moe_aux_loss_coeff": 1.0}, {"ep": 2}, {}),
    # TP=2 with sequence parallelism: the ranks hold halves of the same sequences (summed gradients).
    "tp_sp": (
        {"moe_balance_losses": ["expert", "sequence", "global_expert"], "moe_balance_coeffs": ONES},
        {"tp": 2},
        {"sequence_parallel": True},
    ),
}
REPORTED = ["global_expert_balance_loss", "global_load_balancing_loss", "expert_balance_loss", "seq_balance_loss"]


def _reported() -> dict[str, float]:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    losses: dict = {}
    get_moe_metrics_tracker().report(
        loss_scale=1 / len(BATCHES), iteration=1, force_initialize=True, track_names=REPORTED, num_layers=2,
        total_loss_dict=losses,
    )
    return {k: float(v) for k, v in losses.items()}


def _finish_case(result: dict) -> dict:
    from megatron.core import parallel_state as ps

    result["logged"] = _reported()
    ps.destroy_model_parallel()
    return result


def schedule_references() -> dict:
    return {name: _finish_case(reference_step(overrides)) for name, (overrides, _, _) in SCHEDULE_CASES.items()}


def schedule_parallel(states: dict) -> dict:
    return {
        name: _finish_case(parallel_step({**overrides, **layout}, parallel, states[name]))
        for name, (overrides, parallel, layout) in SCHEDULE_CASES.items()
    }


@pytest.fixture(scope="module")
def global_runs() -> dict:
    (refs,) = run_distributed(schedule_references, 1)
    results = run_distributed(schedule_parallel, 2, {name: ref["state"] for name, ref in refs.items()})
    return {"ref": refs, "par": results}


@pytest.mark.world_size(2)
def test_global_batch_loss_dp2_two_microbatches_equals_single_rank(global_runs) -> None:
    ref = global_runs["ref"]["ours"]
    results = [r["ours"] for r in global_runs["par"]]
    assert all(r["dp_size"] == 2 for r in results)
    assert_parity(ref, results)  # every gradient shard, router weights included, and the LM loss
    logged = ref["logged"]["global_expert_balance_loss"]
    assert logged > 1.0  # imbalanced (1 at perfect balance), so the check is not vacuous
    for r in results:
        assert r["logged"]["global_expert_balance_loss"] == pytest.approx(logged, rel=1e-5)
    # The loss is in the gradient: the router weights differ from the run without it.
    router = "decoder.layers.0.mlp.router.weight"
    assert not torch.allclose(ref["grads"][router], global_runs["ref"]["none"]["grads"][router])


@pytest.mark.world_size(2)
def test_megatron_global_aux_loss_router_gradient_is_one_over_dp(global_runs) -> None:
    """Megatron 0.19's global_aux_loss divides the local score sum by the global token count and
    DDP then averages over DP: its share of the router gradient is 1/DP of one rank's."""
    refs, par = global_runs["ref"], global_runs["par"][0]
    with pytest.raises(AssertionError):
        assert_parity(refs["megatron"], [r["megatron"] for r in global_runs["par"]])
    for layer in (0, 1):
        name = f"decoder.layers.{layer}.mlp.router.weight"
        ref_aux = refs["megatron"]["grads"][name] - refs["none"]["grads"][name]
        par_aux = par["megatron"]["grads"][name][0] - par["none"]["grads"][name][0]
        ours_aux = par["ours"]["grads"][name][0] - par["none"]["grads"][name][0]
        assert ref_aux.abs().max() > 1e-4
        torch.testing.assert_close(par_aux, ref_aux / 2, rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(ours_aux, refs["ours"]["grads"][name] - refs["none"]["grads"][name],
                                   rtol=1e-3, atol=1e-7)


@pytest.mark.world_size(2)
def test_losses_under_tp2_sequence_parallel_equal_single_rank(global_runs) -> None:
    """Shards of the same tokens: expert counts all-reduced over TP x CP, the sequence loss averaged
    over the shards, DP = 1 for the global loss; gradients and logged values equal one rank's."""
    ref = global_runs["ref"]["tp_sp"]
    results = [r["tp_sp"] for r in global_runs["par"]]
    assert_parity(ref, results)
    for name in ("expert_balance_loss", "seq_balance_loss", "global_expert_balance_loss"):
        assert ref["logged"][name] > 1.0, name
        for r in results:
            assert r["logged"][name] == pytest.approx(ref["logged"][name], rel=1e-5), name
