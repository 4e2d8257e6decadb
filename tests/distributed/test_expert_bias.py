"""Expert biases (Megatron's default ``add_bias_linear=True``) in FineGrainedExperts, inside Megatron's
real MoELayer of the tiny GPT: equal to Megatron's SequentialMLP (same weights and biases, loss and
every gradient, every CPU backend), parallel parity (EP=2, TP=2+SP) with one rank, and torch_dist
checkpoints interchangeable with SequentialMLP across EP sizes.

Biases are set to random values before anything is compared: Megatron initialises them to zero,
which would hide a bias that is dropped, or added without the routing probability.

SequentialMLP runs at EP=2 here: with biases it fails at EP=1 and expert TP 1 in megatron-core 0.19.2
(its fc2, a RowParallelLinear over a group of one, returns the matmul output through
``_ReduceFromModelParallelRegion`` as a view, and ``MLP.forward``'s ``output += output_bias * probs``
modifies it in place: autograd refuses). Our experts have no such restriction.
"""

from __future__ import annotations

import re
import zlib

import pytest
import torch
import torch.nn.functional as F

from megatron_moe_ext.testing import run_distributed
from test_checkpoint import load_and_probe, train_and_save
from test_parity import BATCHES, assert_parity, parallel_step

BIAS = {"add_bias_linear": True}
# hidden 32, dense ffn 64, G=2, E=2, k0=1: 4 SwiGLU experts of 32, top-2 (test_fine_grained_experts.py).
FINE = dict(
    moe_granularity=2, moe_expansion_rate=2, moe_base_topk=1, gated_linear_unit=True, activation_func=F.silu,
    moe_expert_backend="grouped", **BIAS,
)
CASES = {
    "swiglu_g2": FINE,
    "gelu": dict(BIAS),  # tiny default: 4 GELU experts, top-2
    # Megatron's GLU options: the gate clamped from above, the linear half clamped and offset.
    "swiglu_clamp_offset": dict(FINE, activation_func_clamp_value=0.3, glu_linear_offset=0.25),
    # Probabilities scale the input (top-1): the fc2 bias is then added unscaled.
    "probs_on_input": dict(BIAS, moe_router_topk=1, moe_router_pre_softmax=True, moe_apply_probs_on_input=True),
}
BACKENDS = ("grouped", "eager", "loop", "padded")
_LOCAL_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)\.")


def randomize_biases(model: torch.nn.Module) -> None:
    """Every bias (experts, attention, norms) to N(0, 0.2^2), seeded by its global name (replicas
    agree, experts differ): Megatron's zero init would test nothing. Not the router's: against its
    small weights it would send every token to one EP rank's experts."""
    from megatron_moe_ext.testing.tiny import global_name

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and ".router." not in name:
                gen = torch.Generator().manual_seed(zlib.crc32(global_name(name, model.config).encode()))
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SequentialMLP's per-expert names (``...experts.local_experts.{e}.linear_fc1.bias``) -> our
    stacked ones (``...experts.linear_fc1.bias``, expert axis first)."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _LOCAL_EXPERT.search(name)
        if match is None:
            out[name] = tensor
        else:
            groups.setdefault(f"{name[:match.start()]}.experts.{name[match.end():]}", {})[int(match.group(1))] = tensor
    for name, by_expert in groups.items():
        out[name] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    return out


def _load(model, params: dict[str, torch.Tensor]) -> None:
    """Every parameter of ``model`` from ``params`` (strict: no parameter missing or left over)."""
    names = {name for name, _ in model.named_parameters()}
    assert names == set(params), sorted(names ^ set(params))
    state = model.state_dict()  # with the extra-state entries of Megatron's linears
    state.update(params)
    model.load_state_dict(state)


def _step(model) -> tuple[list[float], dict[str, torch.Tensor]]:
    from megatron_moe_ext.testing.tiny import data_parallel_slice, forward_backward, wrap_ddp

    ddp = wrap_ddp(model)
    losses = forward_backward(ddp, [data_parallel_slice(b) for b in BATCHES])
    return losses, {name: p.main_grad.detach().clone() for name, p in model.named_parameters()}


def _expert_checkpoint_layout(model) -> dict[str, tuple]:
    """Global shape of every expert entry of ``sharded_state_dict`` (a SwiGLU factory's pieces built)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    layout: dict[str, tuple] = {}
    for value in model.sharded_state_dict().values():
        pieces = value.build() if isinstance(value, ShardedTensorFactory) else [value]
        for piece in pieces if isinstance(pieces, list) else [pieces]:
            if ".experts." in piece.key:
                layout.setdefault(piece.key, set()).add(tuple(piece.global_shape))
    return layout


def compare_with_sequential_mlp() -> dict:
    """Per EP rank (EP=2): per case, SequentialMLP (Megatron's local experts) with random biases, then
    ours with the same weights and biases on every CPU backend, and ours with the expert biases dropped."""
    from megatron_moe_ext.testing.tiny import build_tiny_gpt, initialize_parallel, parallel_sizes, tiny_config

    initialize_parallel(seed=1234, ep=2)

    def config(overrides: dict, backend: str):
        return tiny_config(**{**overrides, "moe_expert_backend": backend}, **parallel_sizes(ep=2))

    results = {}
    for case, overrides in CASES.items():
        ref = build_tiny_gpt(config(overrides, "megatron"))
        randomize_biases(ref)
        state = stack_experts({name: p.detach().clone() for name, p in ref.named_parameters()})
        ref_layout = _expert_checkpoint_layout(ref)
        ref_losses, ref_grads = _step(ref)
        result = {"experts_class": type(ref.decoder.layers[0].mlp.experts).__name__, "ref_losses": ref_losses,
                  "ref_grads": stack_experts(ref_grads), "ours": {}}
        for backend in BACKENDS:
            ours = build_tiny_gpt(config(overrides, backend))
            _load(ours, state)
            result["ours"][backend] = _step(ours)
            result["layout"] = (ref_layout, _expert_checkpoint_layout(ours))
        ours = build_tiny_gpt(config(overrides, "grouped"))
        dropped = {k: (torch.zeros_like(v) if ".experts.linear_fc" in k and k.endswith(".bias") else v)
                   for k, v in state.items()}
        _load(ours, dropped)
        result["control_losses"] = _step(ours)[0]
        results[case] = result
    return results


@pytest.fixture(scope="module")
def sequential() -> list[dict]:
    return run_distributed(compare_with_sequential_mlp, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_biased_experts_equal_sequential_mlp(case: str, backend: str, sequential) -> None:
    bias_grad_max: dict[str, float] = {}
    for rank, by_case in enumerate(sequential):
        result = by_case[case]
        assert result["experts_class"] == "SequentialMLP"
        losses, grads = result["ours"][backend]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(result["ref_losses"]), rtol=1e-5, atol=0)
        assert set(grads) == set(result["ref_grads"])
        for name, want in result["ref_grads"].items():
            torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name: f"rank {rank} grad {n}: {m}")
        for n, g in grads.items():
            if ".experts.linear_fc" in n and n.endswith(".bias"):
                bias_grad_max[n] = max(bias_grad_max.get(n, 0.0), g.abs().max().item())
    # 2 layers x fc1, fc2, each reached by some tokens (an EP rank may get none in a layer).
    assert len(bias_grad_max) == 4 and min(bias_grad_max.values()) > 0, bias_grad_max


@pytest.mark.parametrize("case", sorted(CASES))
def test_dropping_the_expert_biases_breaks_parity(case: str, sequential) -> None:
    # Negative control: the comparison above sees the biases.
    for by_case in sequential:
        result = by_case[case]
        diff = (torch.tensor(result["control_losses"]) - torch.tensor(result["ref_losses"])).abs().max().item()
        assert diff > 1e-3, diff


def test_checkpoint_keys_and_shapes_are_sequential_mlps(sequential) -> None:
    ref_layout, ours_layout = sequential[1]["swiglu_g2"]["layout"]  # EP rank 1: experts 2 and 3
    bias_keys = {k for k in ours_layout if k.endswith(".bias")}
    assert bias_keys == {"decoder.layers.mlp.experts.experts.linear_fc1.bias",
                         "decoder.layers.mlp.experts.experts.linear_fc2.bias"}
    assert ours_layout == ref_layout
    # Layer axis, then expert axis: [L, E, F1] and [L, E, H].
    assert ours_layout["decoder.layers.mlp.experts.experts.linear_fc1.bias"] == {(2, 4, 64)}
    assert ours_layout["decoder.layers.mlp.experts.experts.linear_fc2.bias"] == {(2, 4, 32)}


# -- parallel parity with one rank ----------------------------------------------------------------------------------


def reference_with_biases(overrides: dict) -> dict:
    from megatron_moe_ext.testing.tiny import build_tiny_gpt, initialize_parallel, tiny_config

    initialize_parallel(seed=1234)
    model = build_tiny_gpt(tiny_config(**overrides))
    randomize_biases(model)
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses, grads = _step(model)
    return {"state": state, "losses": losses, "grads": grads}


@pytest.fixture(scope="module")
def reference() -> dict:
    (ref,) = run_distributed(reference_with_biases, 1, FINE)
    return ref


PARALLEL = {
    "ep2_alltoall": ({"moe_token_dispatcher_type": "alltoall"}, {"ep": 2}),
    # Experts replicated over TP (expert TP 1) with sequence parallelism: the fc2 bias gradient must
    # not be summed over TP again (see FineGrainedExperts' parameter attributes).
    "tp2_sp_alltoall": ({"moe_token_dispatcher_type": "alltoall", "sequence_parallel": True}, {"tp": 2}),
}


@pytest.mark.world_size(2)
@pytest.mark.parametrize("case", sorted(PARALLEL))
def test_biased_experts_parallel_match_single_rank(case: str, distributed, reference) -> None:
    extra, parallel = PARALLEL[case]
    results = distributed(parallel_step, {**FINE, **extra}, parallel, reference["state"])
    assert_parity(reference, results)
    if parallel.get("ep"):  # the stacked biases really are split over EP
        name = "decoder.layers.0.mlp.experts.linear_fc1.bias"
        assert results[0]["grads"][name][0].shape == (2, 64) and reference["grads"][name].shape == (4, 64)


# -- checkpoints between our experts and SequentialMLP ----------------------------------------------------------------

# SequentialMLP at EP=2 (see the module docstring), ours at EP=1: across EP sizes both ways.
MEGATRON = {**FINE, "moe_expert_backend": "megatron"}


def test_checkpoint_with_biases_ours_ep1_loads_into_sequential_mlp_ep2(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    (saved,) = run_distributed(train_and_save, 1, ckpt, {}, FINE)
    loaded = run_distributed(load_and_probe, 2, ckpt, {"ep": 2}, MEGATRON)
    for fresh, restored in loaded:
        assert not torch.allclose(fresh, saved, atol=1e-3), "fresh model already matches: test is vacuous"
        torch.testing.assert_close(restored, saved, rtol=1e-5, atol=1e-5)


def test_checkpoint_with_biases_sequential_mlp_ep2_loads_into_ours_ep1(tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir()
    saved = run_distributed(train_and_save, 2, ckpt, {"ep": 2}, MEGATRON)
    (loaded,) = run_distributed(load_and_probe, 1, ckpt, {}, FINE)
    fresh, restored = loaded
    assert not torch.allclose(fresh, saved[0], atol=1e-3)
    torch.testing.assert_close(restored, saved[0], rtol=1e-5, atol=1e-5)
