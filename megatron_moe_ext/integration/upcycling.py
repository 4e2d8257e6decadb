"""Granular upcycling: start a fine-grained MoE from a trained dense checkpoint.

Megatron ships granular upcycling (megatron/core/transformer/moe/upcycling_utils.py, method of
He et al. 2024, arXiv 2410.07524), but its ``_get_config`` accepts only SequentialMLP and
TEGroupedMLP experts and raises for any other module: there is no seam for a new experts class.
The integration table's row ``upcycling`` replaces ``upcycling_utils.upcycle_state_dict`` with
``upcycle_state_dict`` below, which converts models whose MoE layers hold ``FineGrainedExperts``
and hands every other model to Megatron's original function unchanged. Megatron's training loop
(``--moe-use-upcycling``) then runs as usual, with two 0.19 bugs mended: the dense source model
is built from the MoE model config (``integration/model_config.py`` fixes that through the
``model_config_cls`` seam), and ``load_checkpoint`` is called with a stale keyword (below).

The conversion, for a dense FFN (fc1 [F1, H], fc2 [H, F]) and granularity G, expansion E:
- expert j = (copy c = j // G, piece i = j % G) gets rows i of fc1 split in G (for gated units,
  piece i of the gate rows and piece i of the up rows) and columns i of fc2 split in G, both times
  ``weight_scale``; the E copies are identical;
- the router keeps one random row per copy, repeated for its G pieces, so a copy's pieces tie and
  are selected together.

- biases (``add_bias_linear``, Megatron's default), as Megatron's own upcycling: fc1's bias split
  like fc1's rows and scaled with them, fc2's bias copied whole into every expert, unscaled; a
  router logit bias is tied per copy like the router rows (Megatron leaves it random per expert).

When is the upcycled model *exactly* the dense model at step 0? With softmax over the selected
experts (``moe_router_pre_softmax=False``), the k0*G selected experts are the G pieces of k0 copies,
each weighted 1/(k0*G), so the MoE output is ``act_scaled / G`` of the dense output. Scaling fc1
and fc2 by s restores it exactly iff the activation is positively homogeneous: ReLU (s = G^(1/2)),
squared ReLU (s = G^(1/3)); and for any activation when G = 1 (s = 1) with top-k >= 2 (Megatron
forces pre-softmax routing at top-1). The same holds with biases: the fc1 bias is scaled inside the
activation with the rows, and the experts scale the fc2 bias by the probability, which sum to 1
over the selected experts (not with ``moe_apply_probs_on_input``, which leaves the fc2 bias unscaled,
but that needs top-1). GELU and SwiGLU are approximate for G > 1 (Megatron's exponents 1/2 and 1/3
are used). Pre-softmax routing is approximate too. Ties between copies, token dropping, or router
noise also break exactness.

Legend: H hidden, F dense FFN, F1 = F or 2F (gated), G granularity, E expansion, N = E*G experts.
"""

from __future__ import annotations

import torch

ACTIVATIONS_WITH_CUBE_ROOT = ("squared_relu",)


def weight_scale(*, granularity: int, expansion_rate: int, topk: int, pre_softmax: bool, activation: str, gated: bool) -> float:
    """Factor on fc1 and fc2 that restores the dense activation scale (arXiv 2410.07524)."""
    activation_scale = (expansion_rate * granularity * granularity) / topk if pre_softmax else granularity
    exponent = 1 / 3 if (gated or activation in ACTIVATIONS_WITH_CUBE_ROOT) else 1 / 2
    return activation_scale**exponent


def _fc1_pieces(fc1_F1: torch.Tensor, granularity: int, gated: bool) -> torch.Tensor:
    """fc1 rows (weight [F1, H] or bias [F1]) split in G pieces along dim 0 -> [G, F1/G, ...]; for gated units
    piece i is [gate piece i; up piece i]."""
    if gated:
        gate, up = torch.chunk(fc1_F1, 2, dim=0)
        pieces = [torch.cat([g, u], dim=0)
                  for g, u in zip(torch.chunk(gate, granularity, 0), torch.chunk(up, granularity, 0))]
    else:
        pieces = list(torch.chunk(fc1_F1, granularity, dim=0))
    return torch.stack(pieces)


def upcycle_experts(
    fc1_F1H: torch.Tensor, fc2_HF: torch.Tensor, *, granularity: int, expansion_rate: int, gated: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fc1/fc2 -> stacked experts ``w1 [N, F1/G, H]``, ``w2 [N, H, F/G]`` (copy-major)."""
    w1_GF1H = _fc1_pieces(fc1_F1H, granularity, gated) * scale
    w2_GHF = torch.stack(torch.chunk(fc2_HF, granularity, dim=1)) * scale
    return w1_GF1H.repeat(expansion_rate, 1, 1), w2_GHF.repeat(expansion_rate, 1, 1)


def upcycle_expert_biases(
    b1_F1: torch.Tensor, b2_H: torch.Tensor, *, granularity: int, expansion_rate: int, gated: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fc1/fc2 biases -> stacked expert biases ``b1 [N, F1/G]``, ``b2 [N, H]``, as Megatron's upcycling
    (``_process_fc1_bias_param``/``_process_fc2_bias_param``): the fc1 bias split like the fc1 rows and scaled
    like them (it sits inside the activation with them); the fc2 bias whole in every expert, unscaled (the
    experts scale it by the routing probability, and the selected probabilities sum to 1)."""
    b1_GF1 = _fc1_pieces(b1_F1, granularity, gated) * scale
    return b1_GF1.repeat(expansion_rate, 1), b2_H.unsqueeze(0).repeat(granularity * expansion_rate, 1)


def upcycle_router(router_NH: torch.Tensor, granularity: int) -> torch.Tensor:
    """One row per copy (the first N/G rows; entries for a logit bias [N]), each repeated for its G pieces."""
    copies = router_NH.shape[0] // granularity
    return router_NH[:copies].repeat_interleave(granularity, dim=0)


def _moe_layers(model: torch.nn.Module):
    from megatron_moe_ext.layers.fine_grained_experts import FineGrainedExperts

    for name, module in model.named_modules():
        if isinstance(getattr(module, "experts", None), FineGrainedExperts):
            yield name, module


def convert_dense_to_fine_grained(moe_model: torch.nn.Module, dense_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict for ``moe_model`` (this rank's experts) built from ``dense_model``'s weights."""
    dense = dense_model.state_dict()
    state = moe_model.state_dict()
    for key in dense.keys() & state.keys():
        value = dense[key]
        state[key] = value.clone() if isinstance(value, torch.Tensor) else value
    for name, layer in _moe_layers(moe_model):
        config, experts = layer.config, layer.experts
        dense_ffn = dense[f"{name}.linear_fc2.weight"].shape[1]
        if dense_ffn % config.moe_ffn_hidden_size:
            raise ValueError(
                f"dense FFN size {dense_ffn} is not a multiple of the expert size {config.moe_ffn_hidden_size}; "
                "fix: upcycle with an expert size that divides the dense FFN (--moe-granularity)"
            )
        g = dense_ffn // config.moe_ffn_hidden_size
        if config.num_moe_experts % g:
            raise ValueError(f"{config.num_moe_experts} experts are not a multiple of the granularity {g}")
        e = config.num_moe_experts // g
        scale = weight_scale(
            granularity=g, expansion_rate=e, topk=config.moe_router_topk, pre_softmax=config.moe_router_pre_softmax,
            activation=config.activation_func.__name__, gated=config.gated_linear_unit,
        )
        w1, w2 = upcycle_experts(
            dense[f"{name}.linear_fc1.weight"], dense[f"{name}.linear_fc2.weight"],
            granularity=g, expansion_rate=e, gated=config.gated_linear_unit, scale=scale,
        )
        first = experts.ep_group.rank() * experts.num_local_experts
        local = slice(first, first + experts.num_local_experts)
        state[f"{name}.experts.linear_fc1.weight"] = w1[local].contiguous()
        state[f"{name}.experts.linear_fc2.weight"] = w2[local].contiguous()
        dense_b1, dense_b2 = dense.get(f"{name}.linear_fc1.bias"), dense.get(f"{name}.linear_fc2.bias")
        if (experts.linear_fc1.bias is not None) != (dense_b1 is not None and dense_b2 is not None):
            raise ValueError(
                f"{name}: the dense MLP {'has' if dense_b1 is not None else 'has no'} fc1/fc2 biases, the experts "
                f"{'have' if experts.linear_fc1.bias is not None else 'have none'}; fix: the same add_bias_linear "
                "(--disable-bias-linear or not) for the dense checkpoint and the upcycled run"
            )
        if dense_b1 is not None:
            b1, b2 = upcycle_expert_biases(dense_b1, dense_b2, granularity=g, expansion_rate=e,
                                           gated=config.gated_linear_unit, scale=scale)
            state[f"{name}.experts.linear_fc1.bias"] = b1[local].contiguous()
            state[f"{name}.experts.linear_fc2.bias"] = b2[local].contiguous()
        state[f"{name}.router.weight"] = upcycle_router(state[f"{name}.router.weight"], g)
        if f"{name}.router.bias" in state:
            # Megatron leaves its random logit bias per expert, which unties a copy's pieces: tie it like the rows.
            state[f"{name}.router.bias"] = upcycle_router(state[f"{name}.router.bias"], g)
        # A TE dense layer fuses its pre-MLP norm into fc1; the MoE layer has a separate norm.
        norm_prefix = name[: -len("mlp")] + "pre_mlp_layernorm."
        for suffix in ("weight", "bias"):
            fused = f"{name}.linear_fc1.layer_norm_{suffix}"
            if fused in dense and norm_prefix + suffix in state:
                state[norm_prefix + suffix] = dense[fused].clone()
    return state


def upcycle_state_dict_with(original):
    """Drop-in for Megatron's ``upcycle_state_dict``: ours for FineGrainedExperts, ``original`` otherwise."""

    def upcycle_state_dict(moe_model, dense_model) -> dict:
        if not any(True for chunk in moe_model for _ in _moe_layers(chunk)):
            return original(moe_model, dense_model)
        if len(moe_model) != len(dense_model):
            raise ValueError(f"{len(moe_model)} MoE model chunks but {len(dense_model)} dense chunks")
        if len(moe_model) == 1:
            return {"model": convert_dense_to_fine_grained(moe_model[0], dense_model[0])}
        return {f"model{i}": convert_dense_to_fine_grained(m, d) for i, (m, d) in enumerate(zip(moe_model, dense_model))}

    return upcycle_state_dict


# Importable by name (tests, users): ours for FineGrainedExperts, Megatron's original otherwise.
def upcycle_state_dict(moe_model, dense_model) -> dict:
    """Megatron's ``upcycle_state_dict`` contract, for models with our experts (others: Megatron's function)."""
    from megatron.core.transformer.moe import upcycling_utils

    from megatron_moe_ext.integration.installer import MARK, original

    megatron_fn = upcycling_utils.upcycle_state_dict
    if getattr(megatron_fn, MARK, None) == "upcycling":
        megatron_fn = original("upcycling")
    return upcycle_state_dict_with(megatron_fn)(moe_model, dense_model)


def wrap_upcycle_state_dict(original):
    """Row ``upcycling`` of the integration table."""
    return upcycle_state_dict_with(original)


def wrap_load_and_upcycle_model(original):
    """Row ``upcycling-load-keyword``: 0.19's training.py passes the dense model to ``load_checkpoint`` as
    ``model=``, but ``load_checkpoint``'s parameter is ``ddp_model``."""
    import inspect

    def load_and_upcycle_model(load_dense_ckpt_func, moe_model, dense_model, strict=True, load_args=(), load_kwargs=None):
        load_kwargs = dict(load_kwargs or {})
        params = inspect.signature(load_dense_ckpt_func).parameters
        if "model" in load_kwargs and "model" not in params and "ddp_model" in params:
            load_kwargs = {("ddp_model" if k == "model" else k): v for k, v in load_kwargs.items()}
        return original(load_dense_ckpt_func, moe_model, dense_model, strict, load_args, load_kwargs)

    return load_and_upcycle_model
