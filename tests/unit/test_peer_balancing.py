"""PEER balancing: the subkey loss of a PEER layer is the pure function on the same retrieval (the
default candidate marginals on the retrieval's kept sub-keys; the full marginals on the dense half
scores, with the stride), equals its coefficient at perfect balance and, for the candidate loss, in
expectation under uniformly random routing, passes a finite-difference check through the half
scores, is attached through Megatron's aux-loss autoscaler (also without MoE layers) and logged
under the router's name; the step metrics; the flag validation."""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext.balancing.losses import (
    subkey_candidate_loss,
    subkey_counts,
    subkey_marginal_loss,
)
from megatron_moe_ext.settings.balancing import check_balance_settings
from megatron_moe_ext.kernels.product_keys import (
    product_key_half_scores,
    product_key_topk_with_candidates,
)
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
        tiny_config(**PEER_ONLY, moe_peer_subkey_loss_marginals="full", moe_peer_subkey_loss_stride=0)


def test_config_marginals_choices_and_stride_only_with_full(tiny_config) -> None:
    assert tiny_config(**PEER_ONLY).moe_peer_subkey_loss_marginals == "candidates"  # the default
    assert tiny_config(**PEER_ONLY, moe_peer_subkey_loss_marginals="full", moe_peer_subkey_loss_stride=16)
    with pytest.raises(ValueError, match=r"moe_peer_subkey_loss_marginals='dense' is unknown; choose from "
                                         r"candidates, full"):
        tiny_config(**PEER_ONLY, moe_peer_subkey_loss_marginals="dense")
    with pytest.raises(ValueError, match=r"moe_peer_subkey_loss_stride=16 with moe_peer_subkey_loss_marginals="
                                         r"'candidates'.*fix: --moe-peer-subkey-loss-marginals full "
                                         r"--moe-peer-subkey-loss-stride 16, or drop"):
        tiny_config(**PEER_ONLY, moe_peer_subkey_loss_stride=16)


PEER_ARGV = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
             "--max-position-embeddings", "16", "--moe-peer-num-experts", "64", "--moe-peer-heads", "2",
             "--moe-peer-topk", "4", "--moe-peer-key-dim", "8"]


def test_flags_refuse_stride_with_candidates_before_any_rank(capsys) -> None:
    import warnings

    from megatron_moe_ext.args import parse_megatron_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = parse_megatron_args([*PEER_ARGV, "--moe-peer-subkey-loss-marginals", "full",
                                    "--moe-peer-subkey-loss-stride", "4"], validate=False)
        assert (args.moe_peer_subkey_loss_marginals, args.moe_peer_subkey_loss_stride) == ("full", 4)
        with pytest.raises(SystemExit) as exit_info:
            parse_megatron_args([*PEER_ARGV, "--moe-peer-subkey-loss-stride", "4"], validate=False)
    assert exit_info.value.code == 2
    assert "moe_peer_subkey_loss_stride=4 with moe_peer_subkey_loss_marginals='candidates'" in capsys.readouterr().err


def test_peer_tracks_the_subkey_loss_and_row_usage(tiny_config) -> None:
    names = tiny_config(**PEER_ONLY, moe_balance_losses=["subkey"], moe_balance_metrics=True).ext.balance.tracked_names
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


def test_checkpoint_args_from_before_the_marginals_flag_keep_their_stride() -> None:
    import argparse
    import warnings

    from megatron_moe_ext.analysis.checkpoint_model import analysis_args
    from megatron_moe_ext.args import parse_megatron_args

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = parse_megatron_args([*PEER_ARGV, "--moe-peer-subkey-loss-marginals", "full",
                                    "--moe-peer-subkey-loss-stride", "4"], validate=False)
    old = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "moe_peer_subkey_loss_marginals"})
    a = analysis_args(old, tp=1, ep=1, world_size=1, rank=0, micro_batch_size=1)
    assert (a.moe_peer_subkey_loss_marginals, a.moe_peer_subkey_loss_stride) == ("full", 4)


# ------------------------------------------------------------------------------------------------
# The candidate loss (the PEER default) on the retrieval's own candidates
# ------------------------------------------------------------------------------------------------


def test_candidate_loss_equals_coefficient_at_perfect_balance() -> None:
    T, H, n, D, k, kp, coeff = 8, 2, 4, 6, 2, 3, 0.37
    r_Tk = (torch.arange(T * k) % n).view(T, k)  # token t: diagonal cells, every row and column T*k/n times
    ids_THk = (r_Tk * (n + 1)).view(T, 1, k).expand(T, H, k)
    rows, cols = subkey_counts(ids_THk, n, n)
    assert bool((rows == T * k // n).all()) and bool((cols == T * k // n).all())
    # Candidates of real retrieval on random queries: each token's candidate softmax sums to 1, f = 1.
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    keys = (torch.randn(H, n, D // 2, generator=gen, dtype=torch.float64),
            torch.randn(H, n, D // 2, generator=gen, dtype=torch.float64))
    _, _, candidates = product_key_topk_with_candidates(q, keys, k, subkey_topk=kp)
    assert candidates[0].shape == (T, H, kp)
    valid_T = torch.ones(T, dtype=torch.bool)
    for valid in (None, valid_T):
        loss = subkey_candidate_loss(*candidates, rows, cols, T, k, coeff, valid_T=valid)
        torch.testing.assert_close(loss, torch.tensor(coeff, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kp", [4, 8])
def test_candidate_loss_under_uniform_random_routing_is_coeff_within_2_percent(kp: int) -> None:
    # Random queries against random orthonormal sub-keys: every half score is an i.i.d. N(0, 1) draw, so each
    # sub-key is equally likely in each token's candidates and selections (uniform routing in expectation).
    # Independent Gaussian keys would not do: their norms differ, and the longer keys are selected more.
    T, H, n, D, k, coeff = 8192, 2, 16, 32, 4, 0.01
    gen = torch.Generator().manual_seed(kp)
    q = torch.randn(T, H, D, generator=gen, dtype=torch.float64)
    keys = tuple(torch.linalg.qr(torch.randn(H, D // 2, D // 2, generator=gen, dtype=torch.float64))[0][:, :n]
                 .transpose(1, 2).contiguous() for _ in range(2))
    _, ids_THk, candidates = product_key_topk_with_candidates(q, keys, k, subkey_topk=kp)
    rows, cols = subkey_counts(ids_THk, n, n)
    assert float(rows.double().std() / rows.double().mean()) < 0.1  # the routing is near uniform
    got = subkey_candidate_loss(*candidates, rows, cols, T, k, coeff).item()
    assert got == pytest.approx(coeff, rel=0.02)


def test_candidate_loss_through_half_scores_passes_finite_differences() -> None:
    gen = torch.Generator().manual_seed(2)
    T, H, n, D, k, kp = 6, 2, 5, 4, 2, 3
    q = torch.randn(T, H, D, generator=gen, dtype=torch.float64, requires_grad=True)
    row_keys = torch.randn(H, n, D // 2, generator=gen, dtype=torch.float64, requires_grad=True)
    col_keys = torch.randn(H, n, D // 2, generator=gen, dtype=torch.float64, requires_grad=True)
    valid_T = torch.tensor([True, True, False, True, True, True])
    counts = subkey_counts(torch.randint(0, n * n, (T, H, k), generator=gen), n, n, valid_T=valid_T)

    def loss(q, r, c):
        # Through the retrieval's sparse top-k' backward: the path the layer's gradient takes.
        _, _, candidates = product_key_topk_with_candidates(q, (r, c), k, subkey_topk=kp)
        return subkey_candidate_loss(*candidates, *counts, int(valid_T.sum()), k, 0.1, valid_T=valid_T)

    assert torch.autograd.gradcheck(loss, (q, row_keys, col_keys))


def test_candidate_loss_keeping_every_subkey_is_the_full_loss_through_the_search() -> None:
    gen = torch.Generator().manual_seed(3)
    T, H, n, D, k = 7, 2, 4, 6, 3
    q = torch.randn(T, H, D, generator=gen, dtype=torch.float64, requires_grad=True)
    keys = (torch.randn(H, n, D // 2, generator=gen, dtype=torch.float64, requires_grad=True),
            torch.randn(H, n, D // 2, generator=gen, dtype=torch.float64, requires_grad=True))
    _, ids_THk, candidates = product_key_topk_with_candidates(q, keys, k, subkey_topk=n)
    counts = subkey_counts(ids_THk, n, n)
    got = subkey_candidate_loss(*candidates, *counts, T, k, 0.2)
    ref = subkey_marginal_loss(*product_key_half_scores(q, keys), *counts, T, k, 0.2)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
    for g_got, g_ref in zip(torch.autograd.grad(got, (q, *keys)), torch.autograd.grad(ref, (q, *keys))):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-11, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# The layer (one gloo rank: PEERLayer needs Megatron's process groups)
# ------------------------------------------------------------------------------------------------


def _layer_loss(marginals: str, stride: int, padding: bool) -> dict:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_moe_ext.layers.peer import PEERLayer
    from megatron_moe_ext.testing.tiny import initialize_parallel, tiny_config

    initialize_parallel(seed=5)
    coeff = 0.25
    cfg = dict(PEER_ONLY, moe_balance_losses=["subkey"], moe_balance_coeffs=[coeff],
               moe_peer_subkey_loss_marginals=marginals, moe_peer_subkey_loss_stride=stride)
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

    # Reference: the pure function on the same retrieval (all tokens' counts; full: every s-th token's P).
    H, D, k = 3, 6, 4
    with torch.no_grad():
        ids_TK, _ = on.retrieve(x.reshape(-1, h), valid_T if padding else None)
    q = (x.reshape(-1, h) @ on.query_weight.t()).view(-1, H, D)
    vT = valid_T if padding else None
    rows, cols = subkey_counts(ids_TK.view(-1, H, k), 6, 6, valid_T=vT)
    tokens = int(valid_T.sum()) if padding else S * B
    if marginals == "candidates":
        _, _, candidates = product_key_topk_with_candidates(q, (on.row_keys, on.col_keys), k,
                                                            subkey_topk=on.layout.subkey_topk)
        ref = subkey_candidate_loss(*candidates, rows, cols, tokens, k, coeff, valid_T=vT)
    else:
        a, b = product_key_half_scores(q[::stride], (on.row_keys, on.col_keys))
        ref = subkey_marginal_loss(a, b, rows, cols, tokens, k, coeff, valid_T=None if vT is None else vT[::stride])
    g_ref = torch.autograd.grad(ref, params_on)
    return {
        "out": (out_on.detach(), out_off.detach()),
        "logged": (logged, ref.detach() / coeff),
        "grads": [(gon - goff, gr) for gon, goff, gr in zip(g_on, g_off, g_ref)],
        "scale": float(MoEAuxLossAutoScaler.main_loss_backward_scale),
    }


LAYER_CASES = [("candidates", 1, False), ("candidates", 1, True), ("full", 1, False), ("full", 1, True),
               ("full", 3, True)]


def _layer_runs() -> dict:
    """Every layer case and the metrics run in one rank process (a process start each would cost more than the
    cases); Megatron's parallel state is rebuilt per case, as a fresh process would have it."""
    from megatron.core import parallel_state as ps

    results: dict = {}
    for case in LAYER_CASES:
        results[case] = _layer_loss(*case)
        ps.destroy_model_parallel()
    results["metrics"] = _layer_metrics()
    return results


@pytest.fixture(scope="module")
def layer_runs() -> dict:
    (r,) = run_distributed(_layer_runs, 1)
    return r


@pytest.mark.parametrize("marginals,stride,padding", LAYER_CASES)
def test_layer_loss_is_the_pure_function(layer_runs: dict, marginals: str, stride: int, padding: bool) -> None:
    r = layer_runs[(marginals, stride, padding)]
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


def test_layer_records_step_metrics(layer_runs: dict) -> None:
    r = layer_runs["metrics"]
    for name, want in r["want"].items():
        assert r["got"][name] == pytest.approx(want, rel=1e-6), name
    assert r["pending"] == 0
