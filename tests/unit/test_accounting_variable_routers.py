"""Accounting of routers with variable experts per token (expert choice, ReLU, null experts):
nominal active experts, the router's E + M outputs, FLOPs equal to the work an expert MLP counts,
and ``flops --active-experts``.

Legend: T tokens, N real experts, M null experts, E' = N + M router outputs, H hidden, F expert hidden.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_moe_ext import accounting_cli
from megatron_moe_ext.accounting import ModelShape, account, expected_active_experts
from megatron_moe_ext.kernels.expert_mlp import expert_mlp_eager

H, F, N = 16, 24, 8


def _shape(**kw: object) -> ModelShape:
    base = dict(num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=32, vocab_size=64, seq_length=8,
                num_experts=N, moe_ffn_hidden_size=F, topk=2, add_bias_linear=False, gated_linear_unit=True)
    base.update(kw)
    return ModelShape(**base)  # type: ignore[arg-type]


def test_nominal_active_experts_known_answers() -> None:
    assert expected_active_experts(_shape()) == 2
    assert expected_active_experts(_shape(null_experts=8)) == 2 * 8 / 16  # k N / (N + M)
    assert expected_active_experts(_shape(router_type="expert_choice", ec_capacity_factor=1.5)) == 3.0
    assert expected_active_experts(_shape(router_type="expert_choice", ec_capacity_factor=10.0)) == N  # capped
    assert expected_active_experts(_shape(router_type="relu")) == pytest.approx(2.0)  # default S = 1 - k/N
    assert expected_active_experts(_shape(router_type="relu", relu_target_sparsity=0.5)) == pytest.approx(4.0)
    assert expected_active_experts(_shape(router_type="relu", active_experts=1.25)) == 1.25  # measured wins
    dense = ModelShape(num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=32, vocab_size=64,
                       seq_length=8)
    assert expected_active_experts(dense) == 0.0


def test_expert_flops_and_active_params_follow_active_experts() -> None:
    one_expert_flops = 2 * 3 * F * H  # gated fc1 (2F x H) + fc2 (H x F), 2 FLOPs per multiply-add
    one_expert_params = 3 * F * H
    for shape, a in ((_shape(), 2.0), (_shape(null_experts=8), 1.0), (_shape(router_type="relu", active_experts=0.5), 0.5)):
        acc = account(shape)
        assert acc.active_experts == a
        assert acc.mlp_flops_per_token == round(a * one_expert_flops)
        assert acc.total_params - acc.active_params == round((N - a) * one_expert_params)
    assert account(_shape(router_type="relu", active_experts=0.5)).active_experts_measured
    assert not account(_shape(router_type="relu")).active_experts_measured


def test_router_has_real_plus_null_outputs() -> None:
    assert account(_shape()).router_params == N * H
    assert account(_shape(null_experts=8)).router_params == 16 * H
    assert account(_shape(null_experts=8)).router_flops_per_token == 2 * H * 16
    assert account(_shape(null_experts=8, add_bias_linear=True)).router_params == 16 * H + 16
    # Product keys: the grid holds N + M cells (8 + 8 = 16 = 4 x 4), sub-keys 2 x 4 x D/2 for D = 8.
    pk = account(_shape(router_type="product_key", null_experts=8, pk_key_dim=8, pk_query_norm="none"))
    assert pk.router_params == 8 * H + 2 * 4 * 4


def test_bad_shapes_name_the_fix() -> None:
    with pytest.raises(ValueError, match="null_experts=-1"):
        _shape(null_experts=-1)
    with pytest.raises(ValueError, match="router_type relu.*fix: null_experts=0"):
        _shape(router_type="relu", null_experts=2)
    with pytest.raises(ValueError, match="ec_capacity_factor=0.0.*fix"):
        _shape(router_type="expert_choice", ec_capacity_factor=0.0)
    with pytest.raises(ValueError, match="relu_target_sparsity=1.0.*fix: e.g. 0.75"):
        _shape(router_type="relu", relu_target_sparsity=1.0)
    with pytest.raises(ValueError, match="active_experts=9.*num_experts=8.*fix"):
        _shape(active_experts=9.0)


def _counted_expert_flops_per_token(map_TN: torch.Tensor) -> float:
    """Runs the reference expert MLP (SwiGLU) on the tokens ``map_TN`` routes to each real expert and
    counts its matmul FLOPs with torch's FLOP counter; per token."""
    torch.manual_seed(0)
    T = map_TN.shape[0]
    x_TH = torch.randn(T, H)
    rows_E = [map_TN[:, e].nonzero().flatten() for e in range(N)]
    x_NH = torch.cat([x_TH[r] for r in rows_E])
    w1_EF1H, w2_EHF = torch.randn(N, 2 * F, H), torch.randn(N, H, F)

    def swiglu(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    with FlopCounterMode(display=False) as counter:
        expert_mlp_eager(x_NH, [len(r) for r in rows_E], w1_EF1H, w2_EHF, torch.ones(x_NH.shape[0]), swiglu)
    return counter.get_total_flops() / T


def _null_topk_map(T: int, M: int, k: int) -> torch.Tensor:
    """Top-k over N + M i.i.d. logits (balanced in expectation), real columns kept."""
    g = torch.Generator().manual_seed(1)
    ids_Tk = torch.randn(T, N + M, generator=g).topk(k, dim=-1).indices
    map_TE = torch.zeros(T, N + M, dtype=torch.bool).scatter_(1, ids_Tk, True)
    return map_TE[:, :N]


def _expert_choice_map(T: int, c: int) -> torch.Tensor:
    scores_TN = torch.randn(T, N, generator=torch.Generator().manual_seed(2)).softmax(-1)
    idx_cN = scores_TN.topk(c, dim=0).indices
    return torch.zeros(T, N, dtype=torch.bool).scatter_(0, idx_cN, True)


def test_expert_flops_equal_counted_work() -> None:
    """Measured mean active experts -> accounting's expert FLOPs equal the FLOPs torch counts in
    the expert MLPs for that routing, exactly; the nominal values match within sampling error
    (null experts) or the capacity ceiling (expert choice)."""
    T = 512
    ec_shape = _shape(router_type="expert_choice", ec_capacity_factor=1.25)
    from megatron_moe_ext.settings.expert_choice import ExpertChoiceSettings

    c = ExpertChoiceSettings(capacity_factor=1.25, eval_rule="threshold", topk=2, num_experts=N).capacity(T)
    relu_map = torch.relu(torch.randn(T, N, generator=torch.Generator().manual_seed(3)) - 0.6745) > 0  # P = 1/4
    cases = [
        (_shape(null_experts=8), _null_topk_map(T, 8, 2), 0.05),
        (ec_shape, _expert_choice_map(T, c), N / T),
        (_shape(router_type="relu", relu_target_sparsity=0.75), relu_map, 0.1),
    ]
    for shape, map_TN, tolerance in cases:
        counted = _counted_expert_flops_per_token(map_TN)
        measured = map_TN.sum(-1).float().mean().item()
        acc = account(dataclasses.replace(shape, active_experts=measured))
        assert acc.mlp_flops_per_token == pytest.approx(counted, abs=0.5)
        nominal = account(shape)
        assert abs(nominal.active_experts - measured) <= tolerance * 2, (shape.router_type, measured)
    assert _expert_choice_map(T, c).sum().item() == N * c


def test_flops_cli_active_experts(capsys: pytest.CaptureFixture[str]) -> None:
    ec = ["--moe-router-type", "expert_choice", "--moe-aux-loss-coeff", "0"]  # expert choice refuses aux losses
    assert accounting_cli.main([*ec, "--moe-ec-capacity-factor", "1.5", "--json"]) == 0
    nominal = json.loads(capsys.readouterr().out)
    assert nominal["active_experts"] == 3.0 and not nominal["active_experts_measured"]
    assert nominal["shape"]["ec_capacity_factor"] == 1.5
    assert accounting_cli.main([*ec, "--active-experts=1.5", "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["active_experts"] == 1.5 and measured["active_experts_measured"]
    assert measured["mlp_flops_per_token"] * 2 == nominal["mlp_flops_per_token"]  # the demo has no dense MLP
    assert accounting_cli.main(["--moe-null-experts", "4", "--json"]) == 0
    null = json.loads(capsys.readouterr().out)
    assert null["active_experts"] == 1.0 and null["shape"]["null_experts"] == 4  # 2 x 4 / (4 + 4)
    assert accounting_cli.main(["--moe-router-type", "relu"]) == 0
    assert "nominal: (1 - target sparsity) x experts" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--active-experts", "9"], "active_experts=9.0 must be in"),
    (["--active-experts", "many"], "--active-experts 'many' is not a number"),
    (["--active-experts"], "--active-experts needs a value"),
])
def test_flops_cli_bad_active_experts_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        accounting_cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and ("fix" in err or "e.g." in err)
