"""ReMoE's L1 penalty and controller (known answers), the ReLU router's settings and refusals.

The router itself against an eager reference, in parallel and in training: tests/distributed/
test_relu_null_parallel.py and tests/e2e/test_relu_null_train.py.

Legend: T tokens, N experts.
"""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext.balancing.relu_l1 import adapted_l1_coeff, gate_sparsity_counts, relu_l1_penalty


def test_penalty_known_answer_equals_the_papers_form() -> None:
    # gates [[1, 0], [2, 3]]: counts (2, 1), T = 2, k = 1, lambda = 1.
    # Switch form: N / (k T^2) sum_e c_e P_e = 2 / 4 * (2 * 3 + 1 * 3) = 4.5.
    # Paper's form: w_e = N c_e / (k T) = (2, 1); 1/T sum_t sum_e w_e R_te = (2*1 + 2*2 + 1*3) / 2 = 4.5.
    gates_TN = torch.tensor([[1.0, 0.0], [2.0, 3.0]], requires_grad=True)
    value = relu_l1_penalty(gates_TN, torch.tensor([2, 1]), 2, target_active=1.0, coeff=1.0)
    assert value.item() == pytest.approx(4.5)
    value.backward()
    # d/dR_te = lambda N c_e / (k T^2) = (2*2/4, 2*1/4) for every token
    torch.testing.assert_close(gates_TN.grad, torch.tensor([[1.0, 0.5], [1.0, 0.5]]))


def test_penalty_scales_with_coeff_and_target_and_excludes_padding() -> None:
    gates_TN = torch.tensor([[1.0, 0.0], [2.0, 3.0], [7.0, 7.0]])
    valid_T = torch.tensor([True, True, False])
    base = relu_l1_penalty(gates_TN[:2], torch.tensor([2, 1]), 2, target_active=1.0, coeff=1.0)
    padded = relu_l1_penalty(gates_TN, torch.tensor([2, 1]), 2, target_active=1.0, coeff=1.0, valid_T=valid_T)
    assert padded.item() == pytest.approx(base.item())
    scaled = relu_l1_penalty(gates_TN[:2], torch.tensor([2, 1]), 2, target_active=2.0, coeff=1e-3)
    assert scaled.item() == pytest.approx(4.5 * 1e-3 / 2)


def test_penalty_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="counts_N of shape"):
        relu_l1_penalty(torch.ones(3, 2), torch.ones(3), 3, target_active=1.0, coeff=1.0)
    with pytest.raises(ValueError, match="target_active"):
        relu_l1_penalty(torch.ones(3, 2), torch.ones(2), 3, target_active=0.0, coeff=1.0)


def test_sparsity_counts_of_valid_tokens() -> None:
    map_TN = torch.tensor([[True, False, False, False], [True, True, True, False], [True, True, True, True]])
    torch.testing.assert_close(gate_sparsity_counts(map_TN), torch.tensor([4.0, 12.0], dtype=torch.float64))
    valid_T = torch.tensor([True, True, False])
    torch.testing.assert_close(gate_sparsity_counts(map_TN, valid_T), torch.tensor([4.0, 8.0], dtype=torch.float64))


def test_controller_rule() -> None:
    coeff = torch.tensor([1e-3])
    # Denser than the target (sparsity below it): times alpha; sparser or equal: divided (the authors' code).
    assert adapted_l1_coeff(coeff, torch.tensor(0.3), target=0.5, rate=1.2).item() == pytest.approx(1.2e-3)
    assert adapted_l1_coeff(coeff, torch.tensor(0.7), target=0.5, rate=1.2).item() == pytest.approx(1e-3 / 1.2)
    assert adapted_l1_coeff(coeff, torch.tensor(0.5), target=0.5, rate=1.2).item() == pytest.approx(1e-3 / 1.2)
    with pytest.raises(ValueError, match="rate"):
        adapted_l1_coeff(coeff, torch.tensor(0.5), target=0.5, rate=1.0)


def test_controller_drives_a_toy_sparsity_to_its_target() -> None:
    """A gate whose sparsity rises with the coefficient (S = sigmoid(log10 lambda + 4)) settles within one
    multiplicative step of the target from both sides."""
    for start in (1e-9, 1e2):
        coeff = torch.tensor([start])
        history = []
        for _ in range(400):
            sparsity = torch.sigmoid(torch.log10(coeff) + 4.0)[0]
            history.append(float(sparsity))
            coeff = adapted_l1_coeff(coeff, sparsity, target=0.75, rate=1.2)
        tail = history[-50:]
        assert min(tail) < 0.75 < max(tail) and max(tail) - min(tail) < 0.05


def _config(**overrides):
    from megatron_moe_ext.testing.tiny import tiny_config

    return tiny_config(**{"moe_router_type": "relu", **overrides})


def test_settings_default_target_is_topk_compute_and_step_hook_and_names() -> None:
    from megatron_moe_ext.settings import ext_settings

    ext = ext_settings(_config(num_moe_experts=8, moe_router_topk=2))
    assert ext.router.relu.target_sparsity == pytest.approx(0.75)
    assert ext.router.relu.target_active(8) == pytest.approx(2.0)
    assert ext.needs_step_hook
    for name in ("relu_l1_coeff", "relu_sparsity", "active_experts", "relu_l1_loss"):
        assert name in ext.balance.tracked_names
    assert not ext_settings(_config(moe_router_type="topk")).needs_step_hook


REFUSALS = {
    "target_high": ({"moe_relu_target_sparsity": 1.0}, "must be in \\(0, 1\\); fix"),
    "target_zero": ({"moe_relu_target_sparsity": 0.0}, "must be in \\(0, 1\\); fix"),
    "coeff": ({"moe_relu_l1_coeff": 0.0}, "must be > 0"),
    "rate": ({"moe_relu_l1_update_rate": 1.0}, "must be > 1"),
    "null_experts": ({"moe_null_experts": 2}, "--moe-null-experts 2 with --moe-router-type relu"),
    "sinkhorn": ({"moe_router_load_balancing_type": "sinkhorn"}, "sinkhorn.*fix: aux_loss"),
    "seq_aux": ({"moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 1e-2}, "seq_aux_loss.*fix"),
    "flex": ({"moe_token_dispatcher_type": "flex"}, "flex.*fix: --moe-token-dispatcher-type allgather"),
    "expert_bias": ({"moe_router_enable_expert_bias": True}, "--moe-router-enable-expert-bias"),
    "scaling": ({"moe_router_topk_scaling_factor": 2.0}, "--moe-router-topk-scaling-factor"),
    "noisy": ({"moe_router_noisy_gating": True}, "--moe-router-noisy-gating"),
    "groups": ({"moe_router_num_groups": 2, "moe_router_group_topk": 1}, "group-limited"),
    "balance_losses": ({"moe_balance_losses": ["expert"]}, "--moe-balance-losses.*fix"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_values_and_the_fix(case: str) -> None:
    overrides, message = REFUSALS[case]
    with pytest.raises(ValueError, match=message):
        _config(**overrides)


def test_aux_losses_z_loss_capacity_and_metrics_are_accepted() -> None:
    _config(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3,
            moe_expert_capacity_factor=1.5, moe_balance_metrics=True)
