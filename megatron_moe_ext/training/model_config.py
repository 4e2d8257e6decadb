"""GPT model config for the train entry: Megatron's ``GPTModelConfig`` with a builder that also
serves Megatron's upcycling step.

Megatron 0.19's ``--moe-use-upcycling`` (megatron/training/training.py, setup_model_and_optimizer)
builds the dense source model by setting ``args.num_experts = None`` and rebuilding "the model";
but with a model config container it rebuilds from ``cfg.model``, which still describes the MoE
model, so the dense checkpoint never fits. ``gpt_config_from_args`` takes a ``model_config_cls``
(a seam), so our subclass's builder notices that window and builds the dense model instead.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import ClassVar

from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig


@dataclasses.dataclass
class MoEExtGPTModelConfig(GPTModelConfig):
    """GPTModelConfig whose builder is ``MoEExtGPTModelBuilder``."""

    builder: ClassVar[str] = "megatron_moe_ext.training.model_config.MoEExtGPTModelBuilder"


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
        if getattr(args, "moe_use_upcycling", False) and args.num_experts is None:
            dense = _dense_source_config(self._model_config, args.ffn_hidden_size)
            return GPTModelBuilder(dense).build_model(pg_collection, pre_process, post_process, vp_stage)
        return super().build_model(pg_collection, pre_process, post_process, vp_stage)
