"""Null experts: the column split, the logged statistics (known answers), the step metrics over N + M,
the settings and their refusals.

The routers against Megatron's router over N + M, in Megatron's MoELayer and in parallel:
tests/distributed/test_relu_null_parallel.py; training: tests/e2e/test_relu_null_train.py.

Legend: T tokens, N real experts, M null experts, E = N + M.
"""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext.balancing.step_metrics import step_load_metrics
from megatron_moe_ext.layers.null_experts import null_routing_stats, split_null_columns


def test_split_keeps_real_columns_with_gradients_and_detaches_null_ones() -> None:
    probs_TE = torch.tensor([[0.5, 0.0, 0.0, 0.5], [0.0, 0.0, 0.7, 0.3]], requires_grad=True)
    map_TE = probs_TE.detach() > 0
    probs_TN, map_TN, null_map_TM, null_probs_TM = split_null_columns(probs_TE, map_TE, 2)
    assert probs_TN.shape == (2, 2) and probs_TN.is_contiguous() and map_TN.is_contiguous()
    assert torch.equal(map_TN, torch.tensor([[True, False], [False, False]]))
    assert torch.equal(null_map_TM, torch.tensor([[False, True], [True, True]]))
    assert not null_probs_TM.requires_grad
    probs_TN.sum().backward()
    torch.testing.assert_close(probs_TE.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]))


def test_null_fraction_and_active_experts_known_answers() -> None:
    # Top-2 over 2 real + 2 null: token 0 real+null, token 1 null+null, token 2 real+real (padding).
    map_TN = torch.tensor([[True, False], [False, False], [True, True]])
    null_TM = torch.tensor([[False, True], [True, True], [False, False]])
    fraction, active = null_routing_stats(map_TN, null_TM)
    assert fraction.item() == pytest.approx(3 / 6) and active.item() == pytest.approx(3 / 3)
    fraction, active = null_routing_stats(map_TN, null_TM, torch.tensor([True, True, False]))
    assert fraction.item() == pytest.approx(3 / 4) and active.item() == pytest.approx(1 / 2)


def test_step_metrics_balance_all_columns_but_ep_metrics_only_real_experts() -> None:
    # 4 real experts on 2 EP ranks + 2 null: loads 4 4 4 4 | 8 0.
    counts = torch.tensor([4, 4, 4, 4, 8, 0])
    values = step_load_metrics(counts, ep_size=2, num_real=4)
    assert values["max_violation"].item() == pytest.approx((8 - 4) / 4)  # over all 6 columns, mean 4
    assert values["max_violation_ep_rank_max"].item() == pytest.approx(0.0)
    assert values["device_max_violation"].item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="does not divide the 3 real experts"):
        step_load_metrics(counts, ep_size=2, num_real=3)


def _config(**overrides):
    from megatron_moe_ext.testing.tiny import tiny_config

    return tiny_config(**{"moe_null_experts": 2, **overrides})


def test_settings_router_choice_names_and_product_key_grid() -> None:
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_ext.layers.null_experts import null_expert_config
    from megatron_moe_ext.settings import ext_settings
    from megatron_moe_ext.specs import router_class

    config = _config()
    ext = ext_settings(config)
    assert ext.router.null_experts == 2
    assert {"null_fraction", "active_experts"} <= set(ext.balance.tracked_names)
    assert router_class(config).__name__ == "NullExpertTopKRouter"
    router_config = null_expert_config(config)
    assert isinstance(router_config, TransformerConfig)
    assert router_config.num_moe_experts == 6 and config.num_moe_experts == 4
    plain = _config(moe_null_experts=0)
    assert null_expert_config(plain) is plain
    pk = ext_settings(_config(num_moe_experts=14, moe_router_type="product_key", moe_pk_key_dim=8))
    assert pk.router.pk_layout.pool_size == 16  # the grid holds N + M cells


REFUSALS = {
    "relu": ({"moe_router_type": "relu"}, "--moe-null-experts 2 with --moe-router-type relu.*fix"),
    "negative": ({"moe_null_experts": -1}, "must be >= 0"),
    "device_loss": ({"moe_balance_losses": ["device"], "expert_model_parallel_size": 2},
                    "--moe-balance-losses device.*fix: expert"),
    "groups": ({"moe_router_num_groups": 2, "moe_router_group_topk": 1}, "group-limited routing"),
    "flex": ({"moe_token_dispatcher_type": "flex"}, "flex.*fix: --moe-token-dispatcher-type allgather"),
    "pk_grid": ({"num_moe_experts": 16, "moe_router_type": "product_key", "moe_pk_key_dim": 8},
                "18 experts per head.*not a perfect square"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_values_and_the_fix(case: str) -> None:
    overrides, message = REFUSALS[case]
    with pytest.raises(ValueError, match=message):
        _config(**overrides)
