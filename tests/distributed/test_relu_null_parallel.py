"""The ReLU router (ReMoE) and null experts against eager references, inside Megatron's MoELayer, and in
parallel against one rank.

References: the ReLU router against an eager computation of its gates, ReMoE's L1 penalty, Megatron's
z-loss and aux loss (probs, map, gradients of the router weight and the input); the top-k router with
M null experts against Megatron's own TopKRouter (NoisyTopKRouter, BalancedTopKRouter) over N + M
experts, sliced to the N real columns; the product-key router with null experts against the
product-key router over N + M real experts, sliced. In Megatron's MoELayer: tokens routed only to null
experts get an MoE output of exactly 0 and the experts receive exactly the real selections as rows.
Parallel: EP=2 and TP=2+SP equal one rank (Megatron's allgather dispatcher: its dropless alltoall
assumes exactly top-k experts per token, see docs of this issue).

Legend: S sequence, B micro-batch, T = S*B tokens, N real experts, M null experts, E = N + M, h hidden.
"""

from __future__ import annotations

import pytest
import torch
from test_parity import assert_parity, parallel_step, reference_step

from megatron_moe_ext.testing import run_distributed

HIDDEN = 32
TOKENS = (6, 3)  # [S, B]


def _init_parallel() -> None:
    from megatron.core import parallel_state as ps

    from megatron_moe_ext.testing.tiny import initialize_parallel

    if not ps.model_parallel_is_initialized():
        initialize_parallel()


def _pg():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def _tracked() -> dict[str, float]:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    values = {name: float(entry.values.sum()) for name, entry in tracker.metrics.items()}
    tracker.clear()
    return values


def _inputs(padded: bool, N: int):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(*TOKENS, HIDDEN, generator=gen)
    pad = torch.zeros(TOKENS, dtype=torch.bool)
    if padded:
        pad[-2:, 0] = True
    return x, (pad if padded else None), torch.randn(TOKENS[0] * TOKENS[1], N, generator=gen)


# ----------------------------------------------------------------------------------------------------------
# ReLU router vs eager
# ----------------------------------------------------------------------------------------------------------

RELU_CASES = {
    "plain": {},
    "aux_z": {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 1e-2, "moe_z_loss_coeff": 1e-3},
    "sigmoid_aux": {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 1e-2,
                    "moe_router_score_function": "sigmoid"},
    "target_0.8": {"moe_relu_target_sparsity": 0.8},
}


def relu_eager(weight_Eh, x, pad_T, g_TN, *, coeff, target_active, aux_coeff, z_coeff, topk, score):
    """Eager ReLU routing and the scalar whose gradient the router's backward must give."""
    N = weight_Eh.shape[0]
    logits_TN = x.reshape(-1, x.shape[-1]) @ weight_Eh.t()
    gates_TN = torch.relu(logits_TN)
    map_TN = gates_TN > 0
    valid_T = torch.ones(logits_TN.shape[0], dtype=torch.bool) if pad_T is None else ~pad_T.reshape(-1)
    v_T1 = valid_T.unsqueeze(-1).float()
    T = valid_T.sum().float()
    counts_N = (map_TN & valid_T.unsqueeze(-1)).sum(0).float()
    # ReMoE: 1/T sum_t sum_e w_e R_te, w_e = N c_e / (k T)
    l1 = coeff * ((counts_N * N / (target_active * T)) * (gates_TN * v_T1)).sum() / T
    total = (gates_TN * g_TN).sum() + l1
    if aux_coeff:
        scores_TN = torch.softmax(logits_TN, -1) if score == "softmax" else torch.sigmoid(logits_TN)
        if score == "sigmoid":
            scores_TN = scores_TN / (scores_TN.sum(-1, keepdim=True) + 1e-20)
        # Megatron's switch loss: N coeff / (k T^2) sum_e c_e sum_t s_te
        total = total + aux_coeff * N / (topk * T * T) * (counts_N * (scores_TN * v_T1).sum(0)).sum()
    if z_coeff:
        total = total + z_coeff * (torch.logsumexp(logits_TN, -1).square() * v_T1[:, 0]).sum() / T
    return gates_TN, map_TN, total, l1


def compare_relu(options: dict, padded: bool) -> dict:
    from megatron_moe_ext.layers.relu_router import ReluRouter
    from megatron_moe_ext.testing.tiny import tiny_config

    _init_parallel()
    torch.manual_seed(0)
    config = tiny_config(moe_router_type="relu", num_moe_experts=8, **options)
    router = ReluRouter(config, pg_collection=_pg())
    router.set_layer_number(1)
    router.relu_l1_coeff.fill_(0.05)  # large enough that the penalty shows in the gradients
    x, pad, g_TN = _inputs(padded, 8)
    xr = x.clone().requires_grad_(True)
    probs, routing_map = router(xr, padding_mask=pad)
    (probs * g_TN).sum().backward()
    tracked = _tracked()
    w = router.weight.detach().clone().requires_grad_(True)
    xe = x.clone().requires_grad_(True)
    gates, emap, total, l1 = relu_eager(
        w, xe, pad, g_TN, coeff=0.05, target_active=router.target_active,
        aux_coeff=config.moe_aux_loss_coeff if config.moe_router_load_balancing_type == "aux_loss" else 0.0,
        z_coeff=config.moe_z_loss_coeff or 0.0, topk=config.moe_router_topk, score=config.moe_router_score_function,
    )
    total.backward()
    return {
        "probs": (probs.detach(), gates.detach()), "map": (routing_map, emap),
        "w_grad": (router.weight.grad.clone(), w.grad), "x_grad": (xr.grad, xe.grad),
        "l1_logged": (tracked["relu_l1_loss"], float(l1) / 0.05),
        "step_counts": router.relu_step_counts.clone(), "valid": (~pad).sum().item() if padded else TOKENS[0] * TOKENS[1],
    }


def all_relu() -> dict:
    return {(name, padded): compare_relu(opts, padded) for name, opts in RELU_CASES.items() for padded in (False, True)}


@pytest.fixture(scope="module")
def relu_results() -> dict:
    (results,) = run_distributed(all_relu, 1)
    return results


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("case", sorted(RELU_CASES))
def test_relu_router_matches_eager_reference(case: str, padded: bool, relu_results) -> None:
    r = relu_results[(case, padded)]
    torch.testing.assert_close(r["probs"][0], r["probs"][1], rtol=1e-6, atol=1e-7)
    assert torch.equal(r["map"][0], r["map"][1])
    rows = r["map"][0].sum(1)
    assert rows.min() < rows.max(), "the test batch should have tokens with different numbers of experts"
    torch.testing.assert_close(r["w_grad"][0], r["w_grad"][1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r["x_grad"][0], r["x_grad"][1], rtol=1e-5, atol=1e-7)
    assert r["l1_logged"][0] == pytest.approx(r["l1_logged"][1], rel=1e-5)
    zeros, total = r["step_counts"].tolist()
    assert total == r["valid"] * 8 and 0 < zeros < total


def relu_eval() -> tuple:
    from megatron_moe_ext.layers.relu_router import ReluRouter
    from megatron_moe_ext.testing.tiny import tiny_config

    _init_parallel()
    router = ReluRouter(tiny_config(moe_router_type="relu"), pg_collection=_pg())
    router.set_layer_number(1)
    router.eval()
    x = torch.randn(*TOKENS, HIDDEN)
    probs, routing_map = router(x)
    logits = x.reshape(-1, HIDDEN) @ router.weight.t()
    return probs, routing_map, torch.relu(logits), router.relu_step_counts.clone(), _tracked()


def test_relu_eval_has_no_penalty_and_no_counting() -> None:
    probs, routing_map, expected, counts, tracked = run_distributed(relu_eval, 1)[0]
    torch.testing.assert_close(probs, expected)
    assert torch.equal(routing_map, expected > 0)
    assert counts.abs().sum() == 0 and "relu_l1_loss" not in tracked


def relu_controller_step() -> tuple:
    from megatron_moe_ext.testing.tiny import build_tiny_gpt, forward_backward, make_batches, tiny_config, wrap_ddp

    _init_parallel()
    config = tiny_config(moe_router_type="relu", moe_token_dispatcher_type="allgather",
                         moe_relu_target_sparsity=0.9, moe_relu_l1_coeff=1e-3)
    assert config.finalize_model_grads_func is not None
    model = wrap_ddp(build_tiny_gpt(config))
    forward_backward(model, make_batches(2, batch_size=2, seed=1))  # 2 micro-batches, then the hook once
    routers = [m for m in model.modules() if hasattr(m, "apply_relu_step")]
    return [float(r.relu_l1_coeff) for r in routers], _tracked(), len(routers)


def test_relu_controller_step_updates_coefficient_and_records_metrics() -> None:
    """The finalize hook's controller on a real model: one training step, then the coefficient moved by
    exactly one factor alpha in the direction the step's measured sparsity asks for, in every layer."""
    coeffs, tracked, layers = run_distributed(relu_controller_step, 1)[0]
    assert layers == 2
    # Sparsity at init is about 0.5 < 0.9: denser than the target, so lambda was multiplied by alpha.
    assert coeffs == pytest.approx([1e-3 * 1.2] * 2)
    assert 0.2 < tracked["relu_sparsity"] / 2 / 2 < 0.8  # summed over 2 layers, recorded x 2 micro-batches
    assert tracked["relu_l1_coeff"] == pytest.approx(1e-3 * 2 * 2)
    assert tracked["active_experts"] / 4 == pytest.approx(4 * (1 - tracked["relu_sparsity"] / 4), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Null experts vs Megatron's router over N + M
# ----------------------------------------------------------------------------------------------------------

N_REAL, M_NULL = 4, 2
NULL_CASES = {
    "softmax": {},
    "pre_softmax": {"moe_router_pre_softmax": True},
    "sigmoid_top3": {"moe_router_score_function": "sigmoid", "moe_router_topk": 3},
    "aux_z": {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 1e-2, "moe_z_loss_coeff": 1e-3},
    "capacity": {"moe_expert_capacity_factor": 1.0},
    "noisy": {"moe_router_noisy_gating": True},
    "balance_expert_metrics": {"moe_balance_losses": ["expert"], "moe_balance_metrics": True},
}


def compare_null(options: dict, padded: bool) -> dict:
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_ext.layers.balanced_router import BalancedTopKRouter
    from megatron_moe_ext.layers.noisy_gating import NoisyTopKRouter
    from megatron_moe_ext.layers.null_experts import NullExpertTopKRouter
    from megatron_moe_ext.testing.tiny import tiny_config

    _init_parallel()
    torch.manual_seed(0)
    router = NullExpertTopKRouter(tiny_config(num_moe_experts=N_REAL, moe_null_experts=M_NULL, **options),
                                  pg_collection=_pg())
    ref_config = tiny_config(num_moe_experts=N_REAL + M_NULL, **options)
    ref_class = NoisyTopKRouter if options.get("moe_router_noisy_gating") else (
        BalancedTopKRouter if options.get("moe_balance_losses") else TopKRouter)
    ref = ref_class(ref_config, pg_collection=_pg())
    with torch.no_grad():
        ref.weight.copy_(router.weight)
        if options.get("moe_router_noisy_gating"):
            router.noise_weight.copy_(0.3 * torch.randn(router.noise_weight.shape))
            ref.noise_weight.copy_(router.noise_weight)
    x, pad, g_TE = _inputs(padded, N_REAL + M_NULL)
    out = {}
    for name, r in (("null", router), ("ref", ref)):
        r.set_layer_number(1)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(3)  # the same noise draw
        probs, routing_map = r(xi, padding_mask=pad)
        # The reference's null columns get no upstream gradient: nothing downstream reads them.
        g = g_TE[:, :N_REAL] if probs.shape[1] == N_REAL else torch.cat([g_TE[:, :N_REAL], 0 * g_TE[:, N_REAL:]], 1)
        (probs * g).sum().backward()
        out[name] = {"probs": probs.detach(), "map": routing_map, "x_grad": xi.grad, "w_grad": r.weight.grad.clone(),
                     "tracked": _tracked()}
    out["null_selection"] = router.last_null_selection
    out["valid_T"] = None if pad is None else ~pad.reshape(-1)
    return out


def all_null() -> dict:
    return {(name, padded): compare_null(opts, padded) for name, opts in NULL_CASES.items() for padded in (False, True)}


@pytest.fixture(scope="module")
def null_results() -> dict:
    (results,) = run_distributed(all_null, 1)
    return results


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("case", sorted(NULL_CASES))
def test_null_expert_router_equals_megatron_router_over_n_plus_m(case: str, padded: bool, null_results) -> None:
    from megatron_moe_ext.layers.null_experts import null_routing_stats

    r = null_results[(case, padded)]
    null, ref = r["null"], r["ref"]
    assert null["probs"].shape[1] == N_REAL
    torch.testing.assert_close(null["probs"], ref["probs"][:, :N_REAL], rtol=0, atol=0)
    assert torch.equal(null["map"], ref["map"][:, :N_REAL])
    null_map, null_probs = r["null_selection"]
    assert torch.equal(null_map, ref["map"][:, N_REAL:])
    torch.testing.assert_close(null_probs, ref["probs"][:, N_REAL:].float())
    assert null_map.any() and (null["map"].sum(1) < ref["map"].sum(1)).any(), "some slots should be null"
    # Gradients: the null columns contribute nothing (their upstream gradient is cut), the rest is Megatron's.
    torch.testing.assert_close(null["x_grad"], ref["x_grad"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(null["w_grad"], ref["w_grad"], rtol=1e-5, atol=1e-7)
    for name, value in ref["tracked"].items():
        if name not in ("null_fraction", "active_experts"):  # the tracker keeps (zeroed) entries of earlier cases
            assert null["tracked"][name] == pytest.approx(value, rel=1e-5), name
    fraction, active = null_routing_stats(null["map"], null_map, r["valid_T"])
    assert null["tracked"]["null_fraction"] == pytest.approx(float(fraction), rel=1e-6)
    assert null["tracked"]["active_experts"] == pytest.approx(float(active), rel=1e-6)


def compare_pk_null() -> dict:
    from megatron_moe_ext.layers.product_key_router import ProductKeyRouter
    from megatron_moe_ext.testing.tiny import tiny_config

    _init_parallel()
    pk = {"moe_router_type": "product_key", "moe_pk_key_dim": 8, "moe_pk_query_norm": "none",
          "moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 1e-2, "moe_z_loss_coeff": 1e-3,
          "moe_balance_metrics": True}
    torch.manual_seed(0)
    router = ProductKeyRouter(tiny_config(num_moe_experts=14, moe_null_experts=2, **pk), pg_collection=_pg())
    ref = ProductKeyRouter(tiny_config(num_moe_experts=16, **pk), pg_collection=_pg())
    ref.load_state_dict(router.state_dict())
    x, pad, g_TE = _inputs(True, 16)
    out = {}
    for name, r in (("null", router), ("ref", ref)):
        r.set_layer_number(1)
        xi = x.clone().requires_grad_(True)
        probs, routing_map = r(xi, padding_mask=pad)
        g = g_TE[:, :14] if probs.shape[1] == 14 else torch.cat([g_TE[:, :14], 0 * g_TE[:, 14:]], 1)
        (probs * g).sum().backward()
        out[name] = {"probs": probs.detach(), "map": routing_map, "x_grad": xi.grad,
                     "grads": {n: p.grad.clone() for n, p in r.named_parameters()}, "tracked": _tracked()}
    out["null_selection"] = router.last_null_selection
    return out


def test_product_key_null_experts_equal_the_full_grid_sliced() -> None:
    (r,) = run_distributed(compare_pk_null, 1)
    null, ref = r["null"], r["ref"]
    torch.testing.assert_close(null["probs"], ref["probs"][:, :14], rtol=0, atol=0)
    assert torch.equal(null["map"], ref["map"][:, :14])
    assert torch.equal(r["null_selection"][0], ref["map"][:, 14:]) and r["null_selection"][0].any()
    torch.testing.assert_close(null["x_grad"], ref["x_grad"], rtol=1e-5, atol=1e-7)
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(null["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    for name in ("load_balancing_loss", "z_loss"):
        assert null["tracked"][name] == pytest.approx(ref["tracked"][name], rel=1e-5)
    assert 0 < null["tracked"]["null_fraction"] < 1


# ----------------------------------------------------------------------------------------------------------
# Inside Megatron's MoELayer: null-only tokens keep the residual; the experts' rows are the real selections
# ----------------------------------------------------------------------------------------------------------


def moe_layer_with_null_experts() -> dict:
    from megatron_moe_ext.testing.tiny import build_tiny_gpt, make_batches, tiny_config

    _init_parallel()
    torch.manual_seed(0)
    config = tiny_config(num_moe_experts=N_REAL, moe_null_experts=M_NULL, moe_token_dispatcher_type="allgather")
    model = build_tiny_gpt(config)
    layer = model.decoder.layers[0].mlp
    with torch.no_grad():  # real logits 0, null logits random: many tokens pick two null experts
        layer.router.weight[:N_REAL].zero_()
        layer.router.weight[N_REAL:].normal_(std=1.0)
    seen: dict = {}
    layer.router.register_forward_hook(lambda m, i, o: seen.update(map=o[1].detach()))
    layer.register_forward_hook(lambda m, i, o: seen.update(out=o[0].detach()))
    layer.experts.register_forward_pre_hook(
        lambda m, args: seen.update(rows=args[0].shape[0], tokens_per_expert=args[1].clone()))
    batch = make_batches(1, batch_size=2)[0]
    model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum().backward()
    return seen


def test_tokens_routed_only_to_null_experts_keep_the_residual_and_experts_count_real_rows() -> None:
    (seen,) = run_distributed(moe_layer_with_null_experts, 1)
    map_TN = seen["map"]
    out_TH = seen["out"].reshape(map_TN.shape[0], -1)
    null_only = ~map_TN.any(1)
    assert null_only.any() and (~null_only).any()
    assert torch.equal(out_TH[null_only], torch.zeros_like(out_TH[null_only]))  # exactly 0: only the residual
    assert (out_TH[~null_only].abs().sum(1) > 0).all()
    # Expert compute: one row per real selection, per expert as the map says (null slots spend nothing).
    assert seen["rows"] == int(map_TN.sum()) < map_TN.shape[0] * 2
    assert torch.equal(seen["tokens_per_expert"].cpu(), map_TN.sum(0).cpu())


# ----------------------------------------------------------------------------------------------------------
# Parallel = one rank
# ----------------------------------------------------------------------------------------------------------

ALLGATHER = {"moe_token_dispatcher_type": "allgather"}
RELU = {"moe_router_type": "relu", **ALLGATHER}
# TP2+SP: the penalty's counts are all-reduced over the sequence shards, so a large coefficient must match
# exactly; under EP=2 the data-parallel ranks hold different token groups (the penalty is per group, as
# ReMoE's and Megatron's aux loss), so the default 1e-8 keeps its difference below the tolerance.
RELU_TP = {**RELU, "moe_relu_l1_coeff": 1e-2, "moe_router_load_balancing_type": "aux_loss",
           "moe_aux_loss_coeff": 1e-2, "moe_z_loss_coeff": 1e-3}
NULL = {"moe_null_experts": 2, **ALLGATHER}
PK_NULL = {"moe_router_type": "product_key", "num_moe_experts": 14, "moe_null_experts": 2, "moe_pk_key_dim": 8,
           "moe_pk_query_norm": "none", **ALLGATHER}
PARALLEL_CASES = {
    "relu_ep2": (RELU, {"ep": 2}),
    "relu_tp2_sp_penalty": ({**RELU_TP, "sequence_parallel": True}, {"tp": 2}),
    "null_ep2": (NULL, {"ep": 2}),
    "pk_null_ep2": (PK_NULL, {"ep": 2}),
}


@pytest.fixture(scope="module")
def references() -> dict:
    cache: dict = {}

    def get(overrides: dict) -> dict:
        key = tuple(sorted((k, str(v)) for k, v in overrides.items() if k != "sequence_parallel"))
        if key not in cache:
            (cache[key],) = run_distributed(
                reference_step, 1, {k: v for k, v in overrides.items() if k != "sequence_parallel"})
        return cache[key]

    return get


@pytest.mark.world_size(2)
@pytest.mark.parametrize("case", sorted(PARALLEL_CASES))
def test_parallel_matches_single_rank(case: str, distributed, references) -> None:
    overrides, parallel = PARALLEL_CASES[case]
    ref = references(overrides)
    results = distributed(parallel_step, overrides, parallel, ref["state"])
    assert_parity(ref, results)
