"""The GPT model config every entry builds (train, launch, the patched script, analysis, import).

``gpt_model_config(args)`` is the one assembly: ``MoEExtConfig`` from the flags, our block spec
(unless ``--spec`` chose one), our balance names for Megatron's log, the accounting report, and
``MoEExtGPTModelConfig``: Megatron's ``GPTModelConfig`` with a builder that also serves Megatron's
upcycling step.

Megatron 0.19's ``--moe-use-upcycling`` (megatron/training/training.py, setup_model_and_optimizer)
builds the dense source model by setting ``args.num_experts = None`` and rebuilding "the model";
but with a model config container it rebuilds from ``cfg.model``, which still describes the MoE
model, so the dense checkpoint never fits. ``gpt_config_from_args`` takes a ``model_config_cls``
(a seam), so our subclass's builder notices that window and builds the dense model instead.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig


@dataclasses.dataclass
class MoEExtGPTModelConfig(GPTModelConfig):
    """GPTModelConfig whose builder is ``MoEExtGPTModelBuilder``."""

    builder: ClassVar[str] = "megatron_moe_ext.integration.model_config.MoEExtGPTModelBuilder"


def _dense_source_config(model_config: GPTModelConfig, ffn_hidden_size: int) -> GPTModelConfig:
    """The same GPT, with dense FFNs of ``ffn_hidden_size`` instead of MoE layers."""
    transformer = copy.copy(model_config.transformer)  # no __post_init__: nothing is re-derived
    for name, value in (
        ("num_moe_experts", None),
        ("moe_granularity", None),
        ("moe_shared_expert_intermediate_size", None),
        ("ffn_hidden_size", ffn_hidden_size),
        ("expert_model_parallel_size", 1),
    ):
        if hasattr(transformer, name):
            object.__setattr__(transformer, name, value)
    dense = copy.copy(model_config)
    object.__setattr__(dense, "transformer", transformer)
    return dense


class MoEExtGPTModelBuilder(GPTModelBuilder):
    """GPTModelBuilder that builds the dense source model during Megatron's upcycling step."""

    def build_model(self, pg_collection, pre_process=None, post_process=None, vp_stage=None):
        from megatron.training import get_args

        args = get_args()
        if args.moe_use_upcycling and args.num_experts is None:
            dense = _dense_source_config(self._model_config, args.ffn_hidden_size)
            return GPTModelBuilder(dense).build_model(pg_collection, pre_process, post_process, vp_stage)
        return super().build_model(pg_collection, pre_process, post_process, vp_stage)


_LOGGED: dict[str, bool] = {}


def logged_block_spec(config: Any, vp_stage: int | None = None) -> Any:
    """``moe_ext_gpt_block_spec``, printing once which MLP/router/experts classes each layer gets (so a log shows
    that our layers, not Megatron's defaults, were built). Module-level: the model config stores it by name."""
    from megatron.core.transformer.spec_utils import get_submodules
    from megatron.training.utils import print_rank_0

    from megatron_moe_ext.specs import moe_ext_gpt_block_spec

    block = moe_ext_gpt_block_spec(config, vp_stage=vp_stage)
    if not _LOGGED.get("spec"):
        rows = []
        for i, layer in enumerate(block.layer_specs, start=1):
            mlp = layer.submodules.mlp
            name = getattr(getattr(mlp, "func", mlp), "__name__", type(mlp).__name__)
            # A MoELayer partial carries its submodules; a PEER layer's partial (shared_mlp=...) does not.
            sub = get_submodules(mlp) if "submodules" in getattr(mlp, "keywords", {}) else None
            parts = [name]
            for slot in ("router", "experts"):
                value = getattr(sub, slot, None) if sub is not None else None
                if value is not None:
                    parts.append(f"{slot}={getattr(getattr(value, 'func', value), '__name__', value)}")
            rows.append(f"  layer {i}: " + " ".join(parts))
        print_rank_0("> megatron-moe-ext layers:\n" + "\n".join(rows))
        _LOGGED["spec"] = True
    return block


def gpt_model_config(
    args: Any,
    config: Any = None,
    model_config_cls: type | None = None,
    *,
    megatron_gpt_config_from_args: Callable[..., Any] | None = None,
) -> Any:
    """Megatron's ``gpt_config_from_args`` with ``MoEExtConfig``, ``MoEExtGPTModelConfig`` and our block spec
    (unless ``--spec`` chose one), plus our balance names in Megatron's log and the accounting report.

    A caller's own ``config``/``model_config_cls`` (e.g. ModelOpt's) are kept; ``megatron_gpt_config_from_args``
    is Megatron's function (the original, when the launch hooks have replaced the module attribute).
    """
    from megatron.training.utils import print_rank_0

    from megatron_moe_ext.accounting import account, format_report, shape_from_args
    from megatron_moe_ext.args import config_from_args
    from megatron_moe_ext.integration.metrics_logging import set_balance_names
    from megatron_moe_ext.settings import ext_settings

    if megatron_gpt_config_from_args is None:
        from megatron.training.argument_utils import gpt_config_from_args as megatron_gpt_config_from_args
    if model_config_cls is None or model_config_cls is GPTModelConfig:
        model_config_cls = MoEExtGPTModelConfig  # its builder also serves --moe-use-upcycling
    if config is None:
        config = config_from_args(args)
    model_cfg = megatron_gpt_config_from_args(args, config=config, model_config_cls=model_config_cls)
    if model_cfg.transformer_layer_spec is None:  # --spec, when given, wins
        model_cfg.transformer_layer_spec = logged_block_spec
    set_balance_names(ext_settings(config).balance.tracked_names)  # printed by the balance-logging row of the table
    try:
        print_rank_0("> megatron-moe-ext model accounting:\n" + format_report(account(shape_from_args(args))))
    except ValueError as err:  # a flag the accounting does not model: training is still fine
        print_rank_0(f"> megatron-moe-ext model accounting skipped: {err}")
    return model_cfg
