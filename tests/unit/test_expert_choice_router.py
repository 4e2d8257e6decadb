"""ExpertChoiceRouter (layers/expert_choice_router.py) against an eager reference, its causal rules, threshold
estimator and metrics, and its settings (settings/expert_choice.py): known answers and refusals.

The eager reference is written from the paper's definition (Zhou et al. 2022, Sec. 3.1): logits x W^T + b, the
softmax over the N + M outputs, and for each expert column a loop taking its c best valid tokens by a full sort.

Legend: S sequence, B micro-batch, T = S*B tokens, N real experts, M null experts, E = N + M, c capacity, h hidden.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_moe_ext.layers.expert_choice_router import (
    capacity_scores,
    causal_map,
    ema_threshold_update,
    expert_choice_map,
)
from megatron_moe_ext.settings.expert_choice import EC_THRESHOLD_DECAY, ExpertChoiceSettings, expert_choice_settings
from megatron_moe_ext.testing import run_distributed

HIDDEN = 32
S, B = 8, 3
T = S * B


# ---------------------------------------------------------------------------------------------------------
# Pure functions: known answers
# ---------------------------------------------------------------------------------------------------------
def test_capacity_known_answers() -> None:
    ec = ExpertChoiceSettings(capacity_factor=1.0, eval_rule="threshold", topk=2, num_experts=4)
    assert ec.capacity(16) == 8  # 16 x 2 / 4
    assert dataclasses.replace(ec, capacity_factor=1.25).capacity(16) == 10
    assert dataclasses.replace(ec, capacity_factor=0.1).capacity(16) == 1  # ceil(0.8)
    assert dataclasses.replace(ec, capacity_factor=10.0).capacity(16) == 16  # at most the group


def test_expert_choice_map_and_capacity_scores_known_answers() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.1, 0.8], [0.5, 0.6], [0.7, 0.2]])
    expected = torch.tensor([[True, False], [False, True], [False, True], [True, False]])
    assert torch.equal(expert_choice_map(scores, 2), expected)
    torch.testing.assert_close(capacity_scores(scores, 2), torch.tensor([0.7, 0.6]))
    valid = torch.tensor([True, True, True, False])  # row 3 is padding: never chosen
    expected_valid = torch.tensor([[True, False], [False, True], [True, True], [False, False]])
    assert torch.equal(expert_choice_map(scores, 2, valid), expected_valid)
    torch.testing.assert_close(capacity_scores(scores, 2, valid), torch.tensor([0.5, 0.6]))
    one = torch.tensor([False, False, True, False])  # fewer valid rows than c: the only valid row's score
    assert torch.equal(expert_choice_map(scores, 2, one), torch.tensor([[False] * 2] * 2 + [[True] * 2] + [[False] * 2]))
    torch.testing.assert_close(capacity_scores(scores, 2, one), torch.tensor([0.5, 0.6]))
    torch.testing.assert_close(capacity_scores(scores, 2, torch.zeros(4, dtype=torch.bool)), torch.zeros(2))


def test_causal_rules_known_answers() -> None:
    scores = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    thr = torch.tensor([0.5, 0.2, 0.7])
    assert torch.equal(causal_map(scores, "threshold", thresholds_E=thr, topk=1),
                       torch.tensor([[True, True, False], [False, True, False]]))
    assert torch.equal(causal_map(scores, "token_choice", thresholds_E=thr, topk=1),
                       torch.tensor([[True, False, False], [False, False, True]]))
    with pytest.raises(ValueError, match="fix: threshold or token_choice"):
        causal_map(scores, "later", thresholds_E=thr, topk=1)


def test_threshold_ema_known_answers() -> None:
    b = EC_THRESHOLD_DECAY
    thr, mass = torch.zeros(2), torch.zeros(1)
    one = torch.ones(())
    thr, mass = ema_threshold_update(thr, mass, torch.tensor([2.0, 1.0]), one, b)  # first update: q itself
    torch.testing.assert_close(thr, torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(mass, torch.tensor([1 - b]))
    thr, mass = ema_threshold_update(thr, mass, torch.tensor([4.0, 1.0]), one, b)
    m2 = b * (1 - b) + (1 - b)
    torch.testing.assert_close(thr, torch.tensor([(b * (1 - b) * 2 + (1 - b) * 4) / m2, 1.0]))
    torch.testing.assert_close(mass, torch.tensor([m2]))
    same, same_mass = ema_threshold_update(thr, mass, torch.tensor([9.0, 9.0]), torch.zeros(()), b)  # no data
    assert torch.equal(same, thr) and torch.equal(same_mass, mass)
    for _ in range(2000):  # a constant q is a fixed point; the mass tends to 1
        thr, mass = ema_threshold_update(thr, mass, torch.tensor([3.0, 1.0]), one, b)
    torch.testing.assert_close(thr, torch.tensor([3.0, 1.0]))
    assert mass.item() == pytest.approx(1.0, abs=1e-5)  # fp32


# ---------------------------------------------------------------------------------------------------------
# Settings: refusals name the values and the fix
# ---------------------------------------------------------------------------------------------------------
def _getter(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_moe_ext.config import _ext_field_defaults

    base = {f.name: f.default for f in dataclasses.fields(TransformerConfig) if f.default is not dataclasses.MISSING}
    values = {**base, **_ext_field_defaults(), "num_moe_experts": 4, "moe_router_topk": 2,
              "moe_router_type": "expert_choice", "moe_token_dispatcher_type": "allgather",
              "moe_router_load_balancing_type": "none", **overrides}
    return values.__getitem__


def test_settings_known_answer() -> None:
    ec = expert_choice_settings(_getter(moe_ec_capacity_factor=1.5, moe_ec_eval_rule="token_choice"))
    assert ec == ExpertChoiceSettings(capacity_factor=1.5, eval_rule="token_choice", topk=2, num_experts=4)
    assert expert_choice_settings(_getter(moe_router_type="topk", moe_ec_capacity_factor=-1.0)) is None
    # Megatron's aux loss type at coefficient 0 (its default) and the z-loss are fine.
    assert expert_choice_settings(_getter(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0,
                                          moe_z_loss_coeff=1e-3)) is not None


REFUSALS = {
    "capacity_zero": (dict(moe_ec_capacity_factor=0.0), "--moe-ec-capacity-factor 0.0"),
    "capacity_negative": (dict(moe_ec_capacity_factor=-1.0), "--moe-ec-capacity-factor -1.0"),
    "capacity_nan": (dict(moe_ec_capacity_factor=math.nan), "--moe-ec-capacity-factor nan"),
    "rule": (dict(moe_ec_eval_rule="later"), "--moe-ec-eval-rule 'later'"),
    "no_experts": (dict(num_moe_experts=None), "needs MoE experts"),
    "aux_loss": (dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2),
                 "--moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.01"),
    "seq_aux_list": (dict(moe_router_load_balancing_type=["none", "seq_aux_loss"], moe_aux_loss_coeff=[0.0, 1e-3]),
                     "--moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 0.001"),
    "sinkhorn": (dict(moe_router_load_balancing_type="sinkhorn"), "--moe-router-load-balancing-type sinkhorn"),
    "quantile": (dict(moe_router_load_balancing_type="quantile_balancing"), "quantile_balancing"),
    "ours": (dict(moe_balance_losses=["expert"]), "--moe-balance-losses"),
    "ours_metrics": (dict(moe_balance_metrics=True), "--moe-balance-metrics"),
    "sigmoid": (dict(moe_router_score_function="sigmoid"), "--moe-router-score-function sigmoid"),
    "expert_bias": (dict(moe_router_enable_expert_bias=True), "--moe-router-enable-expert-bias"),
    "groups": (dict(moe_router_num_groups=2, moe_router_group_topk=1), "--moe-router-num-groups"),
    "fusion": (dict(moe_router_fusion=True), "--moe-router-fusion"),
    "force_balance": (dict(moe_router_force_load_balancing=True), "--moe-router-force-load-balancing"),
    "force_biased": (dict(moe_router_force_biased=0.5), "--moe-router-force-biased 0.5"),
    "replay": (dict(moe_enable_routing_replay=True), "--moe-enable-routing-replay"),
    "capacity_factor": (dict(moe_expert_capacity_factor=1.0), "--moe-expert-capacity-factor 1.0"),
    "permute_fusion": (dict(moe_permute_fusion=True), "--moe-permute-fusion"),
    "flex": (dict(moe_token_dispatcher_type="flex"), "--moe-token-dispatcher-type flex"),
    "scaling": (dict(moe_router_topk_scaling_factor=2.0), "--moe-router-topk-scaling-factor 2.0"),
    "noisy": (dict(moe_router_noisy_gating=True), "--moe-router-noisy-gating"),
    "context_parallel": (dict(context_parallel_size=2), "--context-parallel-size 2"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_settings_refuse_what_expert_choice_cannot_honour(case: str) -> None:
    overrides, needle = REFUSALS[case]
    with pytest.raises(ValueError) as err:
        expert_choice_settings(_getter(**overrides))
    message = str(err.value)
    assert needle in message and "fix:" in message, message


# ---------------------------------------------------------------------------------------------------------
# The router on one rank (a gloo process) against the eager reference
# ---------------------------------------------------------------------------------------------------------
def _init() -> None:
    from megatron.core import parallel_state as ps

    from megatron_moe_ext.testing.tiny import initialize_parallel

    if not ps.model_parallel_is_initialized():
        initialize_parallel()


def _router(**options):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_moe_ext.layers.expert_choice_router import ExpertChoiceRouter
    from megatron_moe_ext.testing.tiny import tiny_config

    config = tiny_config(hidden_size=HIDDEN, moe_router_type="expert_choice", moe_token_dispatcher_type="allgather",
                         **options)
    router = ExpertChoiceRouter(config, pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    return router


def eager_reference(x_SBh, weight_Eh, bias_E, *, capacity: int, valid_T=None):
    """(logits_TE, scores_TE, map_TE): the paper's definition with loops over experts and a full sort per column."""
    logits_TE = x_SBh.reshape(-1, x_SBh.shape[-1]) @ weight_Eh.t()
    if bias_E is not None:
        logits_TE = logits_TE + bias_E
    scores_TE = torch.softmax(logits_TE.float(), dim=-1)
    n, E = scores_TE.shape
    map_TE = torch.zeros(n, E, dtype=torch.bool)
    candidates = [t for t in range(n) if valid_T is None or bool(valid_T[t])]
    for e in range(E):
        ranked = sorted(candidates, key=lambda t: -float(scores_TE[t, e]))
        map_TE[ranked[:capacity], e] = True
    return logits_TE, scores_TE, map_TE


CASES = {
    "plain": dict(options={}, padded=False),
    "bias_padded": dict(options={"add_bias_linear": True}, padded=True),
    "null2_bias": dict(options={"add_bias_linear": True, "moe_null_experts": 2}, padded=False),
    "null1_padded_capacity1.5": dict(options={"moe_null_experts": 1, "moe_ec_capacity_factor": 1.5}, padded=True),
    # Megatron requires --moe-router-pre-softmax at top-1; expert-choice scores are the full softmax either way.
    "z_loss_top1": dict(options={"moe_z_loss_coeff": 1e-2, "moe_router_topk": 1, "moe_router_pre_softmax": True},
                        padded=False),
}


def _tracked() -> dict[str, float]:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    values = {name: float(entry.values.sum()) for name, entry in tracker.metrics.items()}
    tracker.clear()
    return values


def router_case(options: dict, padded: bool) -> dict:
    _init()
    torch.manual_seed(3)
    router = _router(**options)
    if router.bias is not None:
        with torch.no_grad():
            router.bias.copy_(0.5 * torch.randn(router.bias.shape))
    N, M = router.num_real_experts, router.num_null_experts
    x = torch.randn(S, B, HIDDEN)
    padding = torch.zeros(S, B, dtype=torch.bool)
    if padded:
        padding[-3:, 0] = True
    valid_T = ~padding.reshape(-1)
    grad_TN = torch.randn(T, N)
    capacity = router.ec.capacity(T)

    xi = x.clone().requires_grad_(True)
    probs_TN, map_TN = router(xi, padding_mask=padding if padded else None)
    (probs_TN * grad_TN).sum().backward()
    null = router.last_null_selection
    got = {"probs": probs_TN.detach(), "map": map_TN, "x_grad": xi.grad, "w_grad": router.weight.grad.clone(),
           "b_grad": None if router.bias is None else router.bias.grad.clone(), "tracked": _tracked(),
           "null": None if null is None else (null[0].clone(), null[1].clone()),
           "thresholds": router.ec_thresholds.clone(), "mass": router.ec_threshold_mass.clone()}

    # Reference: the same weights, an independent implementation.
    xr = x.clone().requires_grad_(True)
    w = router.weight.detach().clone().requires_grad_(True)
    b = None if router.bias is None else router.bias.detach().clone().requires_grad_(True)
    logits_TE, scores_TE, map_TE = eager_reference(xr, w, b, capacity=capacity, valid_T=valid_T if padded else None)
    probs_TE = scores_TE * map_TE
    objective = (probs_TE[:, :N] * grad_TN).sum()
    z_coeff = options.get("moe_z_loss_coeff")
    if z_coeff:  # ST-MoE's z-loss (Zoph et al. 2022, Eq. 5): coeff x mean over tokens of logsumexp(logits)^2
        objective = objective + z_coeff * torch.logsumexp(logits_TE, dim=-1).square().mean()
    objective.backward()
    q_E = torch.stack([torch.sort(scores_TE.detach()[valid_T, e], descending=True).values[min(capacity, int(valid_T.sum())) - 1]
                       for e in range(N + M)])
    ref = {"probs": probs_TE[:, :N].detach(), "map": map_TE[:, :N], "null_map": map_TE[:, N:],
           "null_probs": probs_TE[:, N:].detach(), "x_grad": xr.grad, "w_grad": w.grad,
           "b_grad": None if b is None else b.grad, "q": q_E, "capacity": capacity, "valid": valid_T,
           "scores": scores_TE.detach()}

    # Evaluation: the causal rules on the same scores, and batch_choice restoring the training choice.
    from megatron_moe_ext.layers.expert_choice_router import batch_choice

    router.eval()
    with torch.no_grad():
        eval_rule = router.ec.eval_rule
        evals = {}
        for rule in ("threshold", "token_choice"):
            router.ec = dataclasses.replace(router.ec, eval_rule=rule)
            evals[rule] = router(x, padding_mask=padding if padded else None)
        router.ec = dataclasses.replace(router.ec, eval_rule=eval_rule)
        before = router.ec_thresholds.clone()
        with batch_choice(router) as switched:
            evals["batch"] = router(x, padding_mask=padding if padded else None)
        evals["switched"] = switched
        evals["thresholds_untouched"] = torch.equal(before, router.ec_thresholds)
        evals["restored"] = router.force_batch_choice is False
        evals["tracked"] = _tracked()  # nothing is recorded outside training
    return {"got": got, "ref": ref, "eval": evals, "N": N, "M": M, "topk": router.topk}


def causal_model_case(rule: str, null_experts: int) -> dict:
    """The tiny GPT with expert-choice routers in eval mode: logits of the first positions with the later tokens
    replaced, under the causal rule and (negative control) under the batch choice."""
    from megatron_moe_ext.layers.expert_choice_router import batch_choice, expert_choice_routers
    from megatron_moe_ext.testing.tiny import build_tiny_gpt, make_batches, tiny_config

    _init()
    torch.manual_seed(5)
    config = tiny_config(moe_router_type="expert_choice", moe_token_dispatcher_type="allgather", moe_ec_eval_rule=rule,
                         moe_null_experts=null_experts)
    model = build_tiny_gpt(config)
    (batch,) = make_batches(1, batch_size=2, seed=11)
    model.train()
    model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).sum().backward()  # thresholds
    routers = expert_choice_routers(model)
    model.eval()
    cut = 6
    changed = dict(batch)
    changed["tokens"] = batch["tokens"].clone()
    changed["tokens"][:, cut:] = torch.randint(0, 64, changed["tokens"][:, cut:].shape, generator=torch.Generator().manual_seed(1))

    def logits(b):
        with torch.no_grad():
            return model(b["tokens"], b["position_ids"], None)

    out = {"causal": (logits(batch), logits(changed))}
    with batch_choice(model):
        out["batch"] = (logits(batch), logits(changed))
    out["cut"] = cut
    out["thresholds"] = [r.ec_thresholds.clone() for r in routers]
    out["masses"] = [r.ec_threshold_mass.clone() for r in routers]
    return out


def all_cases() -> dict:
    results = {name: router_case(**case) for name, case in CASES.items()}
    for rule in ("threshold", "token_choice"):
        results[f"causal_{rule}"] = causal_model_case(rule, 0)
    results["causal_threshold_null2"] = causal_model_case("threshold", 2)
    return results


@pytest.fixture(scope="module")
def results() -> dict:
    (out,) = run_distributed(all_cases, 1)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_router_matches_eager_reference_forward_and_backward(case: str, results) -> None:
    got, ref = results[case]["got"], results[case]["ref"]
    assert got["map"].dtype == torch.bool and torch.equal(got["map"], ref["map"])
    torch.testing.assert_close(got["probs"], ref["probs"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["x_grad"], ref["x_grad"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["w_grad"], ref["w_grad"], rtol=1e-4, atol=1e-6)
    if ref["b_grad"] is None:
        assert got["b_grad"] is None
    else:
        torch.testing.assert_close(got["b_grad"], ref["b_grad"], rtol=1e-4, atol=1e-6)
    if results[case]["M"]:
        null_map, null_probs = got["null"]
        assert torch.equal(null_map, ref["null_map"])
        torch.testing.assert_close(null_probs, ref["null_probs"], rtol=1e-5, atol=1e-6)
    else:
        assert got["null"] is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_expert_takes_exactly_c_tokens(case: str, results) -> None:
    got, ref = results[case]["got"], results[case]["ref"]
    c = min(ref["capacity"], int(ref["valid"].sum()))
    assert (got["map"].sum(0) == c).all(), got["map"].sum(0)
    if results[case]["M"]:
        assert (got["null"][0].sum(0) == c).all()
    assert not got["map"][~ref["valid"]].any(), "a padding token was chosen"
    # Tokens get any number of experts, 0 included, in this batch: not a fixed top-k.
    assert got["map"].sum(1).unique().numel() > 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_thresholds_track_the_capacity_score(case: str, results) -> None:
    got, ref = results[case]["got"], results[case]["ref"]
    # The first update of the bias-corrected average is q itself.
    torch.testing.assert_close(got["thresholds"], ref["q"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["mass"], torch.tensor([1 - EC_THRESHOLD_DECAY]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_metrics_known_answers(case: str, results) -> None:
    tracked, ref = results[case]["got"]["tracked"], results[case]["ref"]
    N, M, valid = results[case]["N"], results[case]["M"], ref["valid"]
    real_TN = ref["map"] & valid.unsqueeze(-1)
    assert tracked["active_experts"] == pytest.approx(float(real_TN.sum()) / float(valid.sum()), rel=1e-6)
    unrouted = float((~real_TN.any(1) & valid).sum()) / float(valid.sum())
    assert tracked["ec_unrouted_fraction"] == pytest.approx(unrouted, abs=1e-7)
    if M:
        nulls = float(ref["null_map"].sum())
        assert tracked["null_fraction"] == pytest.approx(nulls / (nulls + float(real_TN.sum())), rel=1e-6)
    else:  # the tracker keeps the entries of earlier cases, zeroed
        assert tracked.get("null_fraction", 0.0) == 0.0
    if "moe_z_loss_coeff" in CASES[case]["options"]:
        assert tracked["z_loss"] > 0  # Megatron's z-loss over the E logits
    else:
        assert tracked.get("z_loss", 0.0) == 0.0
    if not CASES[case]["padded"] and not M and "moe_ec_capacity_factor" not in CASES[case]["options"]:
        assert tracked["active_experts"] == pytest.approx(results[case]["topk"])  # N c / T = k at factor 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_eval_rules_and_batch_choice_switch(case: str, results) -> None:
    ev, got, ref = results[case]["eval"], results[case]["got"], results[case]["ref"]
    N, valid = results[case]["N"], ref["valid"].unsqueeze(-1)
    scores_TN = ref["scores"][:, :N]
    probs, routing_map = ev["threshold"]
    assert torch.equal(routing_map, (scores_TN >= got["thresholds"][:N]) & valid)
    torch.testing.assert_close(probs, scores_TN * routing_map, rtol=1e-5, atol=1e-6)
    probs, routing_map = ev["token_choice"]
    top = torch.zeros_like(ref["scores"], dtype=torch.bool).scatter_(1, ref["scores"].topk(results[case]["topk"], -1).indices, True)
    assert torch.equal(routing_map, top[:, :N] & valid)
    torch.testing.assert_close(probs, scores_TN * routing_map, rtol=1e-5, atol=1e-6)
    probs, routing_map = ev["batch"]  # the training choice, in eval mode
    assert ev["switched"] == 1 and ev["restored"] and ev["thresholds_untouched"]
    assert torch.equal(routing_map, ref["map"])
    torch.testing.assert_close(probs, ref["probs"], rtol=1e-5, atol=1e-6)
    assert ev["tracked"] == {name: 0.0 for name in ev["tracked"]}


@pytest.mark.parametrize("case", ["causal_threshold", "causal_token_choice", "causal_threshold_null2"])
def test_causal_rule_never_uses_a_later_token(case: str, results) -> None:
    got = results[case]
    cut = got["cut"]
    original, changed = got["causal"]
    assert (original[:, cut:] - changed[:, cut:]).abs().max() > 1e-2  # the change is visible where it was made
    torch.testing.assert_close(changed[:, :cut], original[:, :cut], rtol=0, atol=1e-6)
    # Negative control: the batch choice over the micro-batch does see the later tokens.
    batch_original, batch_changed = got["batch"]
    assert (batch_changed[:, :cut] - batch_original[:, :cut]).abs().max() > 1e-4
    assert all(m.item() > 0 for m in got["masses"]) and all(t.abs().sum() > 0 for t in got["thresholds"])
