"""PEER balancing: the subkey loss of a PEER layer is the router's pure function on the same half
scores (value, gradient, stride), equals its coefficient at perfect balance, passes a finite-
difference check, is attached through Megatron's aux-loss autoscaler (also without MoE layers) and
logged under the router's name; the step metrics; the flag validation."""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext.balancing.losses import subkey_counts, subkey_marginal_loss
from megatron_moe_ext.balancing.settings import check_balance_settings, tracked_names_for
from megatron_moe_ext.testing import run_distributed

PEER_ONLY = dict(
    num_moe_experts=None, moe_peer_num_experts=36, moe_peer_heads=3, moe_peer_topk=4, moe_peer_key_dim=6,
    moe_peer_layers="all", moe_peer_backend="chunked", moe_peer_query_norm="none",
)


def _settings(**kw):
    base = dict(losses=None, coeffs=None, policy=None, metrics=False, usage_window=100, router_type="topk",
                num_experts=8, ep_size=1, peer_num_experts=None)
    base.update(kw)
    check_balance_settings(**base)


def test_settings_accept_subkey_and_metrics_for_peer_layers() -> None:
    _settings(losses=["subkey"], peer_num_experts=64)  # dense router + PEER
    _settings(losses=["subkey"], metrics=True, num_experts=None, peer_num_experts=64)  # PEER-only model
    _settings(losses=["subkey"], router_type="product_key")  # the router's case, unchanged


def test_settings_refuse_subkey_without_product_keys_or_peer() -> None:
    with pytest.raises(ValueError, match=r"subkey with --moe-router-type topk and no PEER layer.*fix: "
                                         r"--moe-router-type product_key, or --moe-peer-num-experts"):
        _settings(losses=["subkey"])
    with pytest.raises(ValueError, match=r"--moe-balance-losses expert without --num-experts.*fix"):
        _settings(losses=["subkey", "expert"], num_experts=None, peer_num_experts=64)
    with pytest.raises(ValueError, match=r"needs MoE layers.*--moe-peer-num-experts"):
        _settings(metrics=True, num_experts=None)


def test_config_refuses_bad_stride(tiny_config) -> None:
    with pytest.raises(ValueError, match=r"moe_peer_subkey_loss_stride=0 must be an int >= 1; fix"):
        tiny_config(**PEER_ONLY, moe_peer_subkey_loss_stride=0)


def test_peer_tracks_the_subkey_loss_and_row_usage(tiny_config) -> None:
    names = tracked_names_for(tiny_config(**PEER_ONLY, moe_balance_losses=["subkey"], moe_balance_metrics=True))
    assert names[0] == "subkey_balance_loss"
    assert {"max_violation", "load_entropy", "experts_used_fraction", "pk_rows_used", "pk_cols_used"} <= set(names)


def test_pure_loss_equals_coefficient_at_perfect_balance() -> None:
    T, H, n, k, coeff = 8, 2, 4, 2, 0.37
    # Every row and column of every head selected T*k/n times: f = 1, so L = coeff * mean softmax mass = coeff.
    r_Tk = (torch.arange(T * k) % n).view(T, k)  # token t: diagonal cells (r, r), r = 2t, 2t+1 mod n
    ids_THk = (r_Tk * (n + 1)).view(T, 1, k).expand(T, H, k)
    rows, cols = subkey_counts(ids_THk % (n * n), n, n)
    assert bool((rows == T * k // n).all()) and bool((cols == T * k // n).all())
    a, b = torch.randn(T, H, n, dtype=torch.float64), torch.randn(T, H, n, dtype=torch.float64)
    loss = subkey_marginal_loss(a, b, rows, cols, T, k, coeff)
    torch.testing.assert_close(loss, torch.tensor(coeff, dtype=torch.float64))


def test_loss_through_half_scores_passes_finite_differences() -> None:
    from megatron_moe_ext.kernels.product_keys import product_key_half_scores

    gen = torch.Generator().manual_seed(0)
    T, H, n, D, k = 5, 2, 3, 4, 2
    q = torch.randn(T, H, D, generator=gen, dtype=torch.float64, requires_grad=True)
    rows_keys = torch.randn(H, n, D // 2, generator=gen, dtype=torch.float64, requires_grad=True)
    col_keys = torch.randn(H, n, D // 2, generator=gen, dtype=torch.float64, requires_grad=True)
    counts = subkey_counts(torch.randint(0, n * n, (T, H, k), generator=gen), n, n)

    def loss(q, r, c):
        a, b = product_key_half_scores(q, (r, c))
        return subkey_marginal_loss(a, b, *counts, T, k, 0.1)

    assert torch.autograd.gradcheck(loss, (q, rows_keys, col_keys))


# ------------------------------------------------------------------------------------------------
# The layer (one gloo rank: PEERLayer needs Megatron's process groups)
# ------------------------------------------------------------------------------------------------


def _layer_loss(stride: int, padding: bool) -> dict:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_moe_ext.kernels.product_keys import product_key_half_scores
    from megatron_moe_ext.layers.peer import PEERLayer
    from megatron_moe_ext.testing.tiny import initialize_parallel, tiny_config

    initialize_parallel(seed=5)
    coeff = 0.25
    cfg = dict(PEER_ONLY, moe_balance_losses=["subkey"], moe_balance_coeffs=[coeff], moe_peer_subkey_loss_stride=stride)
    on = PEERLayer(tiny_config(**cfg))
    off = PEERLayer(tiny_config(**PEER_ONLY))
    off.load_state_dict(on.state_dict())
    on.set_layer_number(1)
    off.set_layer_number(1)
    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # as a fresh process: our layer must set it
    S, B, h = 6, 2, on.config.hidden_size
    x = torch.randn(S, B, h)
    pad = torch.zeros(B, S, dtype=torch.bool)
    if padding:
        pad[1, -2:] = True
    valid_T = ~pad.transpose(0, 1).reshape(-1)
    dy = torch.randn(S, B, h)
    tracker = get_moe_metrics_tracker()
    tracker.clear()
    params_on = [on.query_weight, on.row_keys, on.col_keys]
    out_on, _ = on(x, padding_mask=pad if padding else None)
    g_on = torch.autograd.grad((out_on * dy).sum(), params_on)
    out_off, _ = off(x, padding_mask=pad if padding else None)
    g_off = torch.autograd.grad((out_off * dy).sum(), [off.query_weight, off.row_keys, off.col_keys])
    logged = tracker.metrics["subkey_balance_loss"].values[0].clone()

    # Reference: the router's pure function on the same half scores (all tokens' counts, every s-th token's P).
    H, D, k = 3, 6, 4
    with torch.no_grad():
        ids_TK, _ = on.retrieve(x.reshape(-1, h), valid_T if padding else None)
    q = (x.reshape(-1, h) @ on.query_weight.t()).view(-1, H, D)
    a, b = product_key_half_scores(q[::stride], (on.row_keys, on.col_keys))
    vT = valid_T if padding else None
    rows, cols = subkey_counts(ids_TK.view(-1, H, k), 6, 6, valid_T=vT)
    tokens = int(valid_T.sum()) if padding else S * B
    ref = subkey_marginal_loss(a, b, rows, cols, tokens, k, coeff, valid_T=None if vT is None else vT[::stride])
    g_ref = torch.autograd.grad(ref, params_on)
    return {
        "out": (out_on.detach(), out_off.detach()),
        "logged": (logged, ref.detach() / coeff),
        "grads": [(gon - goff, gr) for gon, goff, gr in zip(g_on, g_off, g_ref)],
        "scale": float(MoEAuxLossAutoScaler.main_loss_backward_scale),
    }


@pytest.mark.parametrize("stride,padding", [(1, False), (1, True), (3, True)])
def test_layer_loss_is_the_routers_pure_function(stride: int, padding: bool) -> None:
    (r,) = run_distributed(_layer_loss, 1, stride, padding)
    torch.testing.assert_close(*r["out"], rtol=0, atol=0)  # the loss adds gradient only
    torch.testing.assert_close(*r["logged"], rtol=1e-6, atol=0)
    assert r["scale"] == 1.0  # PEER-only: the layer set Megatron's scale (1 micro-batch, no loss scaling)
    for name, (got, want) in zip(["query", "row_keys", "col_keys"], r["grads"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"grad {n}: {m}")


def _layer_metrics() -> dict:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron_moe_ext.balancing.bias_update import finish_balancing_step
    from megatron_moe_ext.balancing.metrics import load_entropy, max_violation
    from megatron_moe_ext.layers.peer import PEERLayer
    from megatron_moe_ext.testing.tiny import initialize_parallel, tiny_config

    initialize_parallel(seed=6)
    layer = PEERLayer(tiny_config(**PEER_ONLY, moe_balance_metrics=True, moe_balance_usage_window=2))
    layer.set_layer_number(1)
    tracker = get_moe_metrics_tracker()
    tracker.clear()
    x = torch.randn(5, 2, layer.config.hidden_size)
    with torch.no_grad():
        ids_TK, _ = layer.retrieve(x.reshape(10, -1), None)
    out, _ = layer(x)
    out.sum().backward()
    finish_balancing_step([layer])
    counts = torch.bincount(ids_TK.reshape(-1), minlength=36)
    rows, cols = subkey_counts(ids_TK.view(10, 3, 4), 6, 6)
    got = {name: float(tracker.metrics[name].values[0]) for name in
           ("max_violation", "load_entropy", "experts_used_fraction", "pk_rows_used", "pk_cols_used")}
    want = {"max_violation": max_violation(counts), "load_entropy": load_entropy(counts),
            "experts_used_fraction": float((counts > 0).double().mean()),
            "pk_rows_used": float((rows > 0).double().mean()), "pk_cols_used": float((cols > 0).double().mean())}
    # Eval forwards count nothing; the step buffer is reset after the step.
    layer.eval()
    layer(x)
    return {"got": got, "want": want, "pending": layer.balancing._micro_batches}


def test_layer_records_step_metrics() -> None:
    (r,) = run_distributed(_layer_metrics, 1)
    for name, want in r["want"].items():
        assert r["got"][name] == pytest.approx(want, rel=1e-6), name
    assert r["pending"] == 0
