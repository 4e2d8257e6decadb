"""ProductKeyRouter and NoisyTopKRouter against Megatron's TopKRouter and dense references, and
the product-key router inside Megatron's real MoELayer at EP=2 and TP=2+SP against one rank.

One head with no query norm is a rank-D dense router: Megatron's TopKRouter whose gate weight is
the full key matrix [c_i; c'_j] times W_q must give the same probs, routing map, aux losses and
gradients. That is the reference for the gate functions, z-loss, Megatron's aux losses, capacity
dropping and padding; heads and query norms get a dense reference built here.
"""

from __future__ import annotations

import pytest
import torch
from test_parity import assert_parity, parallel_step, reference_step

from megatron_moe_ext.testing import run_distributed

HIDDEN = 32
TOKENS = (6, 3)  # [S, B]


def _router_config(**overrides):
    from megatron_moe_ext.testing.tiny import tiny_config

    values = {
        "num_moe_experts": 16, "moe_router_topk": 2, "moe_router_type": "product_key", "moe_pk_key_dim": 8,
        "moe_pk_query_norm": "none",
    }
    values.update(overrides)
    return tiny_config(**values)


def _init_parallel() -> None:
    from megatron.core import parallel_state as ps

    from megatron_moe_ext.testing.tiny import initialize_parallel

    if not ps.model_parallel_is_initialized():
        initialize_parallel()


def _pg():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def full_keys(router) -> torch.Tensor:
    """[H, n1*n2, D]: row i, column j -> [c_i; c'_j] at index i*n2 + j."""
    rows, cols = router.row_keys.detach(), router.col_keys.detach()
    H, n1, D2 = rows.shape
    n2 = cols.shape[1]
    return torch.cat([rows.unsqueeze(2).expand(H, n1, n2, D2), cols.unsqueeze(1).expand(H, n1, n2, D2)], -1).reshape(H, n1 * n2, -1)


def _tracked() -> dict[str, float]:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    values = {name: float(entry.values.sum()) for name, entry in tracker.metrics.items()}
    tracker.clear()
    return values


def compare_with_topk_router(options: dict, padded: bool) -> dict:
    """One head, no query norm: ProductKeyRouter vs TopKRouter with weight = K_full @ W_q (and, with
    add_bias_linear, Megatron's logit bias = K_full @ b_q for our query bias b_q)."""
    from megatron.core.transformer.moe.router import TopKRouter

    _init_parallel()
    torch.manual_seed(0)
    config = _router_config(**options)
    pk = ProductKeyRouterFactory(config)
    dense = TopKRouter(config, pg_collection=_pg())
    dense.set_layer_number(1)
    keys_ND = full_keys(pk)[0]
    with torch.no_grad():
        dense.weight.copy_(keys_ND @ pk.query_weight)
        if pk.query_bias is not None:  # zero-initialised: a nonzero value, or the check is vacuous
            pk.query_bias.copy_(0.5 * torch.randn(pk.query_bias.shape))
            dense.bias.copy_(keys_ND @ pk.query_bias)
    x = torch.randn(*TOKENS, HIDDEN)
    padding = torch.zeros(TOKENS, dtype=torch.bool)
    if padded:
        padding[-2:, 0] = True
    grad_out = torch.randn(TOKENS[0] * TOKENS[1], config.num_moe_experts)
    out = {}
    for name, router in (("pk", pk), ("dense", dense)):
        xi = x.clone().requires_grad_(True)
        probs, routing_map = router(xi, padding_mask=padding if padded else None)
        (probs * grad_out).sum().backward()
        weight_grad = router.weight.grad if name == "dense" else None
        out[name] = {"probs": probs.detach(), "map": routing_map, "x_grad": xi.grad, "tracked": _tracked()}
        if name == "dense":
            # d/dW_q of (K W_q): K^T dL/dW; likewise d/db_q of (K b_q): K^T dL/db.
            out[name]["wq_grad"] = keys_ND.t() @ weight_grad
            out[name]["bq_grad"] = keys_ND.t() @ router.bias.grad if router.bias is not None else None
        else:
            out[name]["wq_grad"] = pk.query_weight.grad.clone()
            out[name]["bq_grad"] = pk.query_bias.grad.clone() if pk.query_bias is not None else None
    return out


def ProductKeyRouterFactory(config, pg=None):
    from megatron_moe_ext.layers.product_key_router import ProductKeyRouter

    router = ProductKeyRouter(config, pg_collection=pg or _pg())
    router.set_layer_number(1)
    return router


AUX = {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 1e-2, "moe_z_loss_coeff": 1e-3}
TOPK_CASES = {
    "softmax": {},
    "softmax_top4_scaled": {"moe_router_topk": 4, "moe_router_topk_scaling_factor": 2.5},
    "pre_softmax": {"moe_router_pre_softmax": True},
    "top1_pre_softmax": {"moe_router_topk": 1, "moe_router_pre_softmax": True},
    "sigmoid": {"moe_router_score_function": "sigmoid"},
    "aux_z": AUX,
    "seq_aux": {"moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 1e-2},
    "global_aux_sigmoid": {
        "moe_router_load_balancing_type": "global_aux_loss", "moe_aux_loss_coeff": 1e-2,
        "moe_router_score_function": "sigmoid",
    },
    "capacity": {"moe_expert_capacity_factor": 1.0, **AUX},
    # Megatron's default add_bias_linear: its router's logit bias [N] against our query bias [H*D].
    "bias_softmax": {"add_bias_linear": True},
    "bias_pre_softmax_aux_z": {"add_bias_linear": True, "moe_router_pre_softmax": True, **AUX},
    "bias_sigmoid": {"add_bias_linear": True, "moe_router_score_function": "sigmoid"},
}


def all_topk_comparisons() -> dict:
    return {(name, padded): compare_with_topk_router(opts, padded) for name, opts in TOPK_CASES.items() for padded in (False, True)}


@pytest.fixture(scope="module")
def topk_comparisons() -> dict:
    (results,) = run_distributed(all_topk_comparisons, 1)
    return results


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("case", sorted(TOPK_CASES))
def test_one_head_equals_megatron_topk_router(case: str, padded: bool, topk_comparisons) -> None:
    got = topk_comparisons[(case, padded)]
    pk, dense = got["pk"], got["dense"]
    assert pk["map"].dtype == torch.bool and torch.equal(pk["map"], dense["map"])
    torch.testing.assert_close(pk["probs"], dense["probs"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pk["x_grad"], dense["x_grad"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pk["wq_grad"], dense["wq_grad"], rtol=1e-4, atol=1e-6)
    if TOPK_CASES[case].get("add_bias_linear"):
        torch.testing.assert_close(pk["bq_grad"], dense["bq_grad"], rtol=1e-4, atol=1e-6)
    else:
        assert pk["bq_grad"] is None and dense["bq_grad"] is None
    assert pk["tracked"].keys() == dense["tracked"].keys()
    for name, value in dense["tracked"].items():
        assert pk["tracked"][name] == pytest.approx(value, rel=1e-5), name
    topk = TOPK_CASES[case].get("moe_router_topk", 2)
    if "moe_expert_capacity_factor" not in TOPK_CASES[case]:
        assert (pk["map"].sum(dim=1) == topk).all()


def heads_and_norms(query_norm: str, bias: bool = False) -> dict:
    """Two heads (disjoint 3x3 pools, 2 picks each) with a query norm vs a dense reference; with
    ``bias`` (add_bias_linear) the reference query is x W_q^T + b_q before the norm."""
    _init_parallel()
    torch.manual_seed(1)
    config = _router_config(num_moe_experts=18, moe_router_topk=4, moe_pk_heads=2, moe_pk_query_norm=query_norm,
                            add_bias_linear=bias)
    router = ProductKeyRouterFactory(config)
    init_bias = None if router.query_bias is None else router.query_bias.detach().clone()
    with torch.no_grad():
        if query_norm != "none":
            router.query_norm.weight.uniform_(0.5, 1.5)
        if getattr(router.query_norm, "bias", None) is not None:
            router.query_norm.bias.uniform_(-0.5, 0.5)
        if bias:  # zero-initialised: a nonzero value, or the check is vacuous
            router.query_bias.uniform_(-1.0, 1.0)
    x = torch.randn(*TOKENS, HIDDEN, requires_grad=True)
    probs, routing_map = router(x)
    grad_out = torch.randn_like(probs)
    (probs * grad_out).sum().backward()
    without_bias = None
    if bias:  # negative control: the same router with its query bias removed
        with torch.no_grad():
            saved = router.query_bias.clone()
            router.query_bias.zero_()
            without_bias = router(x)[0].detach()
            router.query_bias.copy_(saved)

    # Dense reference: full logits per pool, top-2 per pool, softmax over the 4 picks.
    xr = x.detach().clone().requires_grad_(True)
    wq = router.query_weight.detach().clone().requires_grad_(True)
    q = xr.reshape(-1, HIDDEN) @ wq.t()
    bq = None
    if bias:
        bq = router.query_bias.detach().clone().requires_grad_(True)
        q = q + bq
        q.retain_grad()  # the queries' gradient, summed over tokens, is the bias gradient
    q_pre = q
    q = q.view(-1, 2, 8)
    w = getattr(router.query_norm, "weight", None)
    b = getattr(router.query_norm, "bias", None)
    if query_norm == "rmsnorm":
        q = torch.nn.functional.rms_norm(q, (8,), eps=1e-5) * w.detach()
    elif query_norm == "layernorm":
        q = torch.nn.functional.layer_norm(q, (8,), eps=1e-5) * w.detach() + b.detach()
    elif query_norm == "batchnorm":
        flat = q.reshape(q.shape[0], -1)
        q = ((flat - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + 1e-5)).view_as(q) * w.detach() + b.detach()
    logits_THP = torch.einsum("thd,hpd->thp", q, full_keys(router))
    sel, idx = torch.topk(logits_THP, 2, dim=-1)
    ids = (idx + torch.tensor([0, 9]).view(1, 2, 1)).reshape(len(q), -1)
    gates = torch.softmax(sel.reshape(len(q), -1), dim=-1)
    ref = torch.zeros_like(probs).scatter(1, ids, gates)
    (ref * grad_out).sum().backward()
    out = {
        "probs": probs.detach(), "ref": ref.detach(), "map": routing_map, "ref_map": ref.detach() > 0,
        "x_grad": x.grad, "ref_x_grad": xr.grad, "wq_grad": router.query_weight.grad, "ref_wq_grad": wq.grad,
        "state_names": sorted(router.state_dict()), "init_bias": init_bias,
        "sequence_parallel": {n: getattr(p, "sequence_parallel", None) for n, p in router.named_parameters()},
    }
    if bias:
        out.update(bq_grad=router.query_bias.grad, ref_bq_grad=bq.grad, query_grad_sum=q_pre.grad.sum(0),
                   without_bias=without_bias)
    return out


HEAD_CASES = ("none", "rmsnorm", "layernorm", "batchnorm")
BIAS_HEAD_CASES = ("none", "rmsnorm", "layernorm", "batchnorm")


def all_heads_and_norms() -> dict:
    results = {norm: heads_and_norms(norm) for norm in HEAD_CASES}
    results.update({f"{norm}+bias": heads_and_norms(norm, bias=True) for norm in BIAS_HEAD_CASES})
    return results


@pytest.fixture(scope="module")
def head_results() -> dict:
    (results,) = run_distributed(all_heads_and_norms, 1)
    return results


@pytest.mark.parametrize("norm", ["none", "rmsnorm", "layernorm", "batchnorm"])
def test_heads_own_disjoint_pools_and_match_dense_reference(norm: str, head_results) -> None:
    got = head_results[norm]
    assert torch.equal(got["map"], got["ref_map"])
    assert (got["map"].sum(1) == 4).all() and (got["map"][:, :9].sum(1) == 2).all()
    torch.testing.assert_close(got["probs"], got["ref"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["x_grad"], got["ref_x_grad"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["wq_grad"], got["ref_wq_grad"], rtol=1e-4, atol=1e-6)
    # Without add_bias_linear the router holds no query bias: checkpoints of such runs load unchanged.
    assert not any("query_bias" in name for name in got["state_names"])


@pytest.mark.parametrize("norm", BIAS_HEAD_CASES)
def test_query_bias_matches_dense_reference(norm: str, head_results) -> None:
    """add_bias_linear: q = W_q x + b_q before the query norm, forward and backward."""
    got = head_results[f"{norm}+bias"]
    assert "query_bias" in got["state_names"]
    torch.testing.assert_close(got["init_bias"], torch.zeros_like(got["init_bias"]), rtol=0, atol=0)  # zero init
    assert got["sequence_parallel"]["query_bias"] == got["sequence_parallel"]["query_weight"]
    assert torch.equal(got["map"], got["ref_map"])
    torch.testing.assert_close(got["probs"], got["ref"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["x_grad"], got["ref_x_grad"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["wq_grad"], got["ref_wq_grad"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["bq_grad"], got["ref_bq_grad"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["bq_grad"], got["query_grad_sum"], rtol=1e-4, atol=1e-6)
    if norm == "batchnorm":
        # The batch mean cancels a per-feature offset: same routing without it, no gradient to it.
        torch.testing.assert_close(got["without_bias"], got["probs"], rtol=1e-5, atol=1e-6)
        assert got["bq_grad"].abs().max() < 1e-5
    else:  # negative control: the bias is used
        assert got["bq_grad"].abs().max() > 1e-4
        assert not torch.allclose(got["without_bias"], got["probs"], atol=1e-3)


def batchnorm_shard(tokens_TF: torch.Tensor, valid_T: torch.Tensor, grad_TF: torch.Tensor) -> dict:
    """QueryNorm('batchnorm') on this rank's slice of the tokens, statistics over all ranks."""
    import torch.distributed as dist

    from megatron_moe_ext.layers.query_norm import QueryNorm

    rank, world = dist.get_rank(), dist.get_world_size()
    norm = QueryNorm("batchnorm", 2, 4, stats_group=dist.group.WORLD)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8).view(2, 4))
    mine = torch.chunk(torch.arange(len(tokens_TF)), world)[rank]
    q = tokens_TF[mine].view(-1, 2, 4).clone().requires_grad_(True)
    y = norm(q, valid_T[mine])
    (y.reshape(len(mine), -1) * grad_TF[mine]).sum().backward()
    return {"y": y.detach(), "q_grad": q.grad, "w_grad": norm.weight.grad, "running_mean": norm.running_mean.clone()}


@pytest.mark.world_size(2)
def test_batchnorm_statistics_under_sequence_parallel_equal_single_rank(distributed) -> None:
    torch.manual_seed(3)
    tokens = torch.randn(12, 8) * 2 + 1
    valid = torch.ones(12, dtype=torch.bool)
    valid[[4, 10, 11]] = False  # padding on both ranks' slices
    grad = torch.randn(12, 8)
    (single,) = run_distributed(batchnorm_shard, 1, tokens, valid, grad)
    shards = distributed(batchnorm_shard, tokens, valid, grad)
    torch.testing.assert_close(torch.cat([s["y"] for s in shards]), single["y"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([s["q_grad"] for s in shards]), single["q_grad"], rtol=1e-4, atol=1e-6)
    # Replicated affine weight: the ranks' partial gradients sum to the single-rank one.
    torch.testing.assert_close(shards[0]["w_grad"] + shards[1]["w_grad"], single["w_grad"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(shards[0]["running_mean"], single["running_mean"])
    # Padding tokens do not enter the statistics: the valid tokens alone give the same running mean.
    (valid_only,) = run_distributed(batchnorm_shard, 1, tokens[valid], torch.ones(9, dtype=torch.bool), grad[valid])
    torch.testing.assert_close(valid_only["running_mean"], single["running_mean"])
    torch.testing.assert_close(valid_only["y"], single["y"][valid], rtol=1e-5, atol=1e-6)


def noisy_routers() -> dict:
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_ext.layers.noisy_gating import NoisyTopKRouter
    _init_parallel()
    torch.manual_seed(5)
    config = _router_config(moe_router_type="topk", moe_router_noisy_gating=True)
    noisy = NoisyTopKRouter(config, pg_collection=_pg())
    plain = TopKRouter(config, pg_collection=_pg())
    with torch.no_grad():
        plain.weight.copy_(noisy.weight)
    x = torch.randn(64, 4, HIDDEN)
    out = {}
    noisy.eval()
    plain.eval()
    out["eval_equal"] = torch.equal(noisy(x)[0], plain(x)[0])
    noisy.train()
    clean = TopKRouter.gating(noisy, x)
    noisy_logits = noisy.gating(x)
    out["noise_std"] = float((noisy_logits - clean).std())
    probs, _ = noisy(x)
    (probs * torch.randn_like(probs)).sum().backward()
    out["noise_grad"] = float(noisy.noise_weight.grad.norm())

    pk_config = _router_config(moe_router_noisy_gating=True)
    pk = ProductKeyRouterFactory(pk_config)
    pk_clean = ProductKeyRouterFactory(_router_config())
    pk_clean.load_state_dict({k: v for k, v in pk.state_dict().items() if "noise" not in k})
    pk.eval()
    pk_clean.eval()
    out["pk_eval_equal"] = torch.equal(pk(x)[0], pk_clean(x)[0])
    pk.train()
    pk_clean.train()
    out["pk_train_differs"] = not torch.equal(pk(x)[1], pk_clean(x)[1])
    probs, _ = pk(x)
    (probs * torch.randn_like(probs)).sum().backward()
    out["pk_noise_grad"] = float(pk.noise_row_weight.grad.norm() + pk.noise_col_weight.grad.norm())
    return out


def test_noisy_top_k_gating() -> None:
    (got,) = run_distributed(noisy_routers, 1)
    assert got["eval_equal"] and got["pk_eval_equal"], "eval must route on clean logits"
    # Zero-initialised W_noise: noise std softplus(0) = log 2.
    assert got["noise_std"] == pytest.approx(0.6931, rel=0.05)
    assert got["noise_grad"] > 0 and got["pk_noise_grad"] > 0
    assert got["pk_train_differs"]


# Through Megatron's MoELayer in the tiny GPT: 16 experts (4x4 grid), top-2, fine-grained experts.
PK = dict(
    num_moe_experts=16, moe_router_topk=2, moe_router_type="product_key", moe_pk_key_dim=8,
    moe_expert_backend="grouped", **AUX,
)
# Under data parallelism (EP=2 here is DP=2) Megatron's aux_loss is per-rank (not the single-rank
# value) and its global_aux_loss gradient is 1/DP too small in megatron-core 0.19.2 (measured: the
# same parity check fails with Megatron's own TopKRouter); seq_aux_loss is linear over sequences,
# so the EP cases use it.
SEQ_AUX = {"moe_router_load_balancing_type": "seq_aux_loss"}
PARALLEL_CASES = {
    "ep2_alltoall_rmsnorm": ({"moe_token_dispatcher_type": "alltoall", "moe_pk_query_norm": "rmsnorm", **SEQ_AUX}, {"ep": 2}),
    "ep2_allgather_batchnorm": (
        {"moe_token_dispatcher_type": "allgather", "moe_pk_query_norm": "batchnorm", **SEQ_AUX},
        {"ep": 2},
    ),
    "tp2_sp_alltoall_batchnorm": (
        {"moe_token_dispatcher_type": "alltoall", "sequence_parallel": True, "moe_pk_query_norm": "batchnorm"},
        {"tp": 2},
    ),
    # Megatron's default add_bias_linear: the router's query bias (rmsnorm: batch norm would cancel it),
    # next to Megatron's attention, MLP and expert biases.
    "ep2_alltoall_rmsnorm_bias": (
        {"moe_token_dispatcher_type": "alltoall", "moe_pk_query_norm": "rmsnorm", "add_bias_linear": True, **SEQ_AUX},
        {"ep": 2},
    ),
    "tp2_sp_alltoall_rmsnorm_bias": (
        {"moe_token_dispatcher_type": "alltoall", "sequence_parallel": True, "moe_pk_query_norm": "rmsnorm",
         "add_bias_linear": True},
        {"tp": 2},
    ),
}
# Dispatcher and SP do not change single-rank math.
_LAYOUT_ONLY = ("moe_token_dispatcher_type", "sequence_parallel")


def init_query_bias_nonzero() -> None:
    """From now on in this rank process, every query bias (product-key router, PEER) is initialised to
    fixed nonzero values, the same on every rank: it is zero-initialised, which would leave a test of
    the bias vacuous."""
    from megatron_moe_ext.layers.peer import PEERLayer
    from megatron_moe_ext.layers.product_key_router import ProductKeyRouter

    for cls in (ProductKeyRouter, PEERLayer):
        def reset(self, original=cls.reset_parameters):
            original(self)
            bias = getattr(self, "query_bias", None)  # not there yet when Router.__init__ calls this
            if bias is not None:
                with torch.no_grad():
                    bias.copy_(0.5 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(bias.numel())))

        cls.reset_parameters = reset


def reference_step_with_query_bias(overrides: dict) -> dict:
    """``reference_step`` with nonzero query biases: the parallel runs load the reference state, so they
    then apply a bias that changes the routing."""
    init_query_bias_nonzero()
    return reference_step(overrides)


@pytest.fixture(scope="module")
def pk_references() -> dict:
    cache: dict = {}

    def get(extra: dict) -> dict:
        math_opts = {k: v for k, v in extra.items() if k not in _LAYOUT_ONLY}
        key = tuple(sorted(math_opts.items()))
        if key not in cache:
            step = reference_step_with_query_bias if math_opts.get("add_bias_linear") else reference_step
            (cache[key],) = run_distributed(step, 1, {**PK, **math_opts})
        return cache[key]

    return get


@pytest.mark.world_size(2)
@pytest.mark.parametrize("case", sorted(PARALLEL_CASES))
def test_product_key_moe_parallel_matches_single_rank(case: str, distributed, pk_references) -> None:
    extra, parallel = PARALLEL_CASES[case]
    ref = pk_references(extra)
    results = distributed(parallel_step, {**PK, **extra}, parallel, ref["state"])
    assert_parity(ref, results)
    assert any("mlp.router.row_keys" in name for name in ref["grads"])
    bias_grads = [g for name, g in ref["grads"].items() if name.endswith("mlp.router.query_bias")]
    if extra.get("add_bias_linear"):
        assert bias_grads and all(g.abs().max() > 0 for g in bias_grads)
        assert all(ref["state"][n].abs().max() > 0 for n in ref["state"] if n.endswith("router.query_bias"))
    else:
        assert not bias_grads


def _max_violation(counts: torch.Tensor) -> float:
    return float((counts.max() - counts.mean()) / counts.mean())


BIAS_KINDS = {
    "separable": {"moe_pk_bias_balancing": True},
    "expert": {"moe_pk_expert_bias_balancing": True},
    "separable+expert": {"moe_pk_bias_balancing": True, "moe_pk_expert_bias_balancing": True},
}


def _bias_abs(router) -> float:
    return float(sum(bias.abs().sum() for bias, _ in router._bias_buffers()))


def bias_balancing_run(steps: int, kind: str = "separable") -> dict:
    """A router fed a skewed batch, its selection biases updated after every 'step'."""
    from megatron_moe_ext.balancing.bias_update import update_balancing_biases

    _init_parallel()
    torch.manual_seed(11)
    config = _router_config(num_moe_experts=64, moe_router_topk=2, moe_router_bias_update_rate=1e-2,
                            **BIAS_KINDS[kind])
    router = ProductKeyRouterFactory(config)
    x = torch.randn(64, 4, HIDDEN) + 2.0  # a shared offset: most tokens prefer the same experts
    history = []
    for _ in range(steps + 1):
        _, routing_map = router(x)
        history.append(_max_violation(routing_map.sum(0).float()))
        update_balancing_biases([router])
    # Gates come from the unbiased logits of the chosen experts.
    with torch.no_grad():
        probs, routing_map = router(x)
        a, b = router.half_scores(x.reshape(-1, HIDDEN), None)
        full_TN = (a.unsqueeze(-1) + b.unsqueeze(-2)).reshape(a.shape[0], -1)
        chosen = full_TN.masked_fill(~routing_map, float("-inf"))
        expected = torch.softmax(chosen, dim=-1)
    return {"history": history, "probs": probs, "expected": expected, "bias_abs": _bias_abs(router)}


@pytest.mark.parametrize("kind", ["separable", "separable+expert"])
def test_bias_balancing_lowers_max_violation_with_unbiased_gates(kind: str) -> None:
    (got,) = run_distributed(bias_balancing_run, 1, 300, kind)
    before, after = got["history"][0], min(got["history"][-20:])
    print(f"{kind}: MaxVio before {before:.3f}, after 300 updates {after:.3f}")
    assert got["bias_abs"] > 0
    assert after <= 0.5 * before, got["history"][::30]
    torch.testing.assert_close(got["probs"], got["expected"], rtol=1e-5, atol=1e-6)


def bias_update_shard(x_STH: torch.Tensor) -> dict:
    """Row, column and per-expert biases after one update per step, each from this rank's share of
    the step's tokens x_STH[s] (counts all-reduced over the DP group), with 2 micro-batches per step."""
    import torch.distributed as dist

    from megatron_moe_ext.balancing.bias_update import update_balancing_biases

    _init_parallel()
    torch.manual_seed(12)
    router = ProductKeyRouterFactory(_router_config(num_moe_experts=64, moe_router_bias_update_rate=1e-2,
                                                    **BIAS_KINDS["separable+expert"]))
    history = []
    for x_TH in x_STH:
        mine_TH = torch.chunk(x_TH, dist.get_world_size())[dist.get_rank()]
        for micro_TH in torch.chunk(mine_TH, 2):
            router(micro_TH.unsqueeze(1))
        update_balancing_biases([router])
        history.append({"row": router.row_bias.clone(), "col": router.col_bias.clone(),
                        "expert": router.pk_expert_bias.clone()})
    return {"history": history, "counts_left": float(sum(c.abs().sum() for c in router.balancing_counts()))}


@pytest.mark.world_size(2)
def test_bias_update_under_data_parallelism_equals_single_rank(distributed) -> None:
    x_STH = torch.randn(3, 48, HIDDEN) + 1.0
    (single,) = run_distributed(bias_update_shard, 1, x_STH)
    ranks = distributed(bias_update_shard, x_STH)
    last = single["history"][-1]
    assert last["row"].abs().sum() > 0 and last["expert"].abs().sum() > 0
    # Later steps see the earlier updates: the expert bias moved in both directions, not just once.
    assert not torch.equal(single["history"][0]["expert"] * 3, last["expert"])
    for r in ranks:
        assert r["counts_left"] == 0.0  # local counts reset after each update
        for step_single, step_rank in zip(single["history"], r["history"], strict=True):
            for name in ("row", "col", "expert"):
                torch.testing.assert_close(step_rank[name], step_single[name], rtol=0, atol=0)


_BIAS_NAMES = ("row_bias", "col_bias", "pk_expert_bias")


def _bias_model(parallel: dict, seed: int):
    """A tiny GPT with product keys, both selection-bias kinds and Megatron's default add_bias_linear (the
    router's query bias) at ``parallel`` (on this rank)."""
    from megatron_moe_ext.testing.tiny import build_tiny_gpt, initialize_parallel, parallel_sizes

    initialize_parallel(seed=seed, **parallel)
    config = _router_config(sequence_parallel=parallel.get("tp", 1) > 1, add_bias_linear=True,
                            **parallel_sizes(**parallel), **BIAS_KINDS["separable+expert"])
    return build_tiny_gpt(config)


def _query_biases(model) -> dict:
    return {name: p for name, p in model.named_parameters() if name.endswith("router.query_bias")}


def _biases_and_logits(model) -> dict:
    from megatron_moe_ext.testing.tiny import full_logits, make_batches

    batch = make_batches(1, batch_size=2, seed=11)[0]
    biases = {name: buf.clone() for name, buf in model.named_buffers() if name.endswith(_BIAS_NAMES)}
    biases.update({name: p.detach().clone() for name, p in _query_biases(model).items()})
    logits = full_logits(model, batch)
    with torch.no_grad():  # negative control: the same model with its query biases removed
        for p in _query_biases(model).values():
            p.zero_()
    return {"biases": biases, "logits": logits, "logits_without_query_bias": full_logits(model, batch)}


def save_router_biases(ckpt_dir: str, parallel: dict) -> dict:
    """The bias model with its biases set to known values, saved with torch_dist."""
    from megatron.core import dist_checkpointing

    model = _bias_model(parallel, seed=5)
    g = torch.Generator().manual_seed(21)  # the same values on every rank: the biases are replicated
    for name, buf in model.named_buffers():
        if name.endswith(_BIAS_NAMES):
            buf.copy_(torch.randn(buf.shape, generator=g))
    with torch.no_grad():  # the query bias is zero-initialised
        for p in _query_biases(model).values():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    return _biases_and_logits(model)


def load_router_biases(ckpt_dir: str, parallel: dict) -> dict:
    """The bias model built with another seed at ``parallel``, loaded from the checkpoint."""
    from megatron.core import dist_checkpointing

    model = _bias_model(parallel, seed=77)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    return _biases_and_logits(model)


# One direction (TP=2/EP=2 -> 1 rank): the reverse is the same resharding code, and each case costs two process
# starts in CI.
@pytest.mark.parametrize(("save_parallel", "load_parallel"), [({"tp": 2, "ep": 2}, {})])
def test_selection_biases_checkpoint_round_trip_across_parallelism(tmp_path, save_parallel, load_parallel) -> None:
    ckpt = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    saved = run_distributed(save_router_biases, 2 if save_parallel else 1, ckpt, save_parallel)
    loaded = run_distributed(load_router_biases, 2 if load_parallel else 1, ckpt, load_parallel)
    names = set(saved[0]["biases"])
    assert {n.rsplit(".", 1)[-1] for n in names} == {"row_bias", "col_bias", "pk_expert_bias", "query_bias"}
    assert any(n.endswith("pk_expert_bias") and saved[0]["biases"][n].shape == (1, 16) for n in names)
    for got in loaded:
        assert set(got["biases"]) == names
        for name in names:
            torch.testing.assert_close(got["biases"][name], saved[0]["biases"][name], rtol=0, atol=0)
        # The loaded biases select the same experts, so the logits equal the saved model's.
        torch.testing.assert_close(got["logits"], saved[0]["logits"], rtol=1e-5, atol=1e-5)
        # ... and the query bias is part of that: without it the logits differ.
        assert not torch.allclose(got["logits_without_query_bias"], saved[0]["logits"], atol=1e-3)


def bf16_bias_resume() -> dict:
    """Biases saved from an fp32 router, loaded into a fresh router whose buffers a bf16 wrapper cast."""
    _init_parallel()
    config = _router_config(**BIAS_KINDS["separable+expert"])
    source = ProductKeyRouterFactory(config)
    g = torch.Generator().manual_seed(5)
    for bias, _ in source._bias_buffers():
        bias.copy_(1.0 + 1e-3 * torch.randn(bias.shape, generator=g))  # steps of 1e-3 that bf16 would round away
    state = source.state_dict()
    target = ProductKeyRouterFactory(config).to(torch.bfloat16)  # what Float16Module does to buffers
    target.load_state_dict(state)
    return {"saved": {n: state[n] for n in ("row_bias", "col_bias", "pk_expert_bias")},
            "loaded": {n: getattr(target, n).clone() for n in ("row_bias", "col_bias", "pk_expert_bias")},
            "saved_from_bf16": {n: v.dtype for n, v in target.state_dict().items() if n.endswith("bias")}}


def test_selection_biases_stay_fp32_through_a_bf16_resume() -> None:
    (got,) = run_distributed(bf16_bias_resume, 1)
    for name, saved in got["saved"].items():
        assert saved.dtype == torch.float32
        torch.testing.assert_close(got["loaded"][name], saved, rtol=0, atol=0)
    assert set(got["saved_from_bf16"].values()) == {torch.float32}
