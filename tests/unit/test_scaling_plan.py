"""Compute-optimal plans (megatron_moe_ext.scaling.optimum): the Krajewski et al. 2024 preset reproduces the paper's
Table 2, our accounting-based optimum is consistent with accounting.account, and impossible budgets are refused.

Legend: C FLOPs budget, G granularity, N_act active parameters, D tokens, R expansion rate.
"""

from __future__ import annotations

import math

import pytest

from megatron_moe_ext.accounting import account
from megatron_moe_ext.scaling import laws, optimum

PRESET = laws.PRESETS["krajewski2024"]

# Krajewski, Ludziejewski et al. 2024 (arXiv 2402.07871), Table 2: "Compute optimal training hyper-parameters
# for MoE models": (N as E x N_act, D, G, FLOPs, loss).
TABLE_2 = [
    (100e6, 4.37e9, 8, 2.95e18, 3.133),
    (1e9, 28.94e9, 16, 1.93e20, 2.491),
    (3e9, 72.90e9, 16, 1.41e21, 2.245),
    (7e9, 137.60e9, 32, 6.46e21, 2.076),
    (70e9, 941.07e9, 32, 4.16e23, 1.694),
    (300e9, 2.96e12, 64, 5.69e24, 1.503),
    (1e12, 7.94e12, 64, 4.97e25, 1.367),
]


def test_preset_holds_table_1() -> None:
    assert PRESET.coefficients == {"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "g": 2.1, "gamma": 0.58,
                                   "c": 0.47}
    assert PRESET.params == "total"


@pytest.mark.parametrize("n_act, tokens, gran, flops, loss", TABLE_2)
def test_eq10_reproduces_table_2_flops(n_act, tokens, gran, flops, loss) -> None:
    """Eq. 10 with c_f = 6, c_r = 14 and d_model = 64 n_blocks gives Table 2's FLOPs from its N_act, D, G."""
    n_blocks = (n_act / (12 * 64**2)) ** (1 / 3)  # N_act = 12 d^2 n_blocks, d = 64 n_blocks
    assert laws.krajewski2024_params(n_blocks)[1] == pytest.approx(n_act)
    assert laws.krajewski2024_flops(n_blocks, tokens, gran) == pytest.approx(flops, rel=0.01)


@pytest.mark.parametrize("n_act, tokens, gran, flops, loss", TABLE_2)
def test_preset_optimum_reproduces_table_2(n_act, tokens, gran, flops, loss) -> None:
    """The paper's optimisation (Brent per G over n_blocks at fixed FLOPs) picks Table 2's G at each budget, with its
    N_act and D within 5%. Our predicted loss sits 0.014-0.024 below the table's (the table's losses are not
    exactly Eq. 9 at its own N, D, G with Table 1's coefficients either), so the loss is checked to 0.03."""
    opt = optimum.paper_optimum(PRESET, flops)
    assert opt.granularity == gran
    assert opt.active_params == pytest.approx(n_act, rel=0.05)
    assert opt.tokens == pytest.approx(tokens, rel=0.05)
    assert abs(opt.predicted_loss - loss) < 0.03
    assert opt.experts == 64 * gran and opt.topk == gran
    assert opt.tokens * opt.flops_per_token == pytest.approx(flops)
    # The optimum is a minimum: a neighbouring G is worse at the same budget.
    for other in (gran // 2, gran * 2):
        assert optimum.paper_optimum(PRESET, flops, granularities=(other,)).predicted_loss > opt.predicted_loss


def test_router_cost_makes_granularity_free_of_benefit_pick_g1() -> None:
    """Known answer: with g = 0 granularity brings nothing, and Eq. 10 charges routing c_r E G per token, so G = 1."""
    flat = laws.Law("krajewski2024", {**PRESET.coefficients, "g": 1e-12}, params="total")
    assert optimum.paper_optimum(flat, 1e22).granularity == 1
    # Our accounting: a law where only D matters (alpha = 0, g = 0) must pick the cheapest shape per token, the
    # smallest model at G = 1 (the router's 2 h E FLOPs grow with G). (With alpha > 0 and g = 0 it need not be
    # G = 1 there: the sweep's N counts router parameters as active, and the router grows with G.)
    only_d = laws.Law("krajewski2024", {**PRESET.coefficients, "g": 1e-12, "alpha": 0.0}, params="active")
    opt = optimum.accounting_optimum(only_d, 1e20, expansion_rates=(8,))
    assert (opt.granularity, opt.num_layers) == (1, 1)


def test_accounting_optimum_is_the_accounting_of_its_shape() -> None:
    fitted = laws.Law("krajewski2024", dict(PRESET.coefficients), params="active")
    opt = optimum.accounting_optimum(fitted, 1e20, granularities=(1, 2, 4, 8), expansion_rates=(8,))
    shape = optimum.family_shape(int(opt.num_layers), opt.granularity, 8, 1, vocab_size=32768, seq_length=2048)
    acc = account(shape)
    assert opt.flops_per_token == acc.training_flops_per_token
    assert opt.active_params == acc.active_params - acc.embedding_params
    assert opt.tokens * opt.flops_per_token == pytest.approx(1e20)
    assert opt.predicted_loss == pytest.approx(float(fitted.loss(opt.active_params, opt.tokens,
                                                                 granularity=opt.granularity)))
    # No member of the family in the same search beats it (brute force over the same candidates).
    best = math.inf
    for gran in (1, 2, 4, 8):
        for layers in range(1, 161):
            s = optimum.family_shape(layers, gran, 8, 1, vocab_size=32768, seq_length=2048)
            if s is None:
                continue
            a = account(s)
            tokens = 1e20 / a.training_flops_per_token
            if tokens >= 2048:
                best = min(best, float(fitted.loss(a.active_params - a.embedding_params, tokens, granularity=gran)))
    assert opt.predicted_loss == pytest.approx(best)


def test_memory_bound_is_respected_and_binding() -> None:
    joint = laws.Law("joint2025", {"a": 20.0, "alpha": 0.12, "b": 30.0, "beta": 0.15, "c": 0.5, "delta": -0.05,
                                   "gamma": 0.01, "omega": 0.0, "zeta": 0.0})
    free = optimum.accounting_optimum(joint, 1e20, granularities=(1,), expansion_rates=(1, 4, 16, 64))
    bound = free.memory_bytes / 4
    held = optimum.accounting_optimum(joint, 1e20, granularities=(1,), expansion_rates=(1, 4, 16, 64),
                                      memory_bytes=bound)
    assert held.memory_bytes <= bound
    assert held.predicted_loss >= free.predicted_loss
    assert (held.experts, held.num_layers) != (free.experts, free.num_layers)


def test_budgets_no_configuration_fits_are_refused() -> None:
    fitted = laws.Law("krajewski2024", dict(PRESET.coefficients), params="active")
    with pytest.raises(ValueError, match=r"no configuration fits --flops 1e\+06.*smallest.*needs .* FLOPs.*fix: raise"):
        optimum.accounting_optimum(fitted, 1e6)
    joint = laws.Law("joint2025", {k: 0.1 for k in laws.COEFFICIENTS["joint2025"]})
    with pytest.raises(ValueError, match=r"--memory 1000 bytes.*fix: raise the budget \(or the memory bound\)"):
        optimum.accounting_optimum(joint, 1e20, memory_bytes=1e3)
    with pytest.raises(ValueError, match=r"below the smallest configuration.*fix: a budget >="):
        optimum.paper_optimum(PRESET, 1e3)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        optimum.paper_optimum(PRESET, -1.0)
    with pytest.raises(ValueError, match="fitted on active ones; fix"):
        optimum.paper_optimum(fitted, 1e20)
