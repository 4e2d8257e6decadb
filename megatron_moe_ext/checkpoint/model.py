"""A model built from a Megatron argument namespace, and loaded from a torch_dist checkpoint, at any TP/EP.

Used by the converters (import-hf fills a fresh model's sharded state) and by analysis (which rebuilds a trained
model from the namespace saved in its checkpoint). The model goes through the same config class, GPT builder and
layer specs as training (``integration.model_config``); Megatron's ``dist_checkpointing`` reshards whatever
TP/EP the checkpoint was saved with. Nothing of the optimizer is read. Runs inside an initialised process group.
"""

from __future__ import annotations

import argparse

import torch


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """Build the model of ``args`` on this rank, through the train entry's config class, GPT builder and specs.

    Needs torch.distributed initialised with ``args.world_size`` ranks; initialises Megatron's model-parallel
    groups for ``args``' layout and sets Megatron's global args."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.global_vars import set_args

    from megatron_moe_ext.args import config_from_args
    from megatron_moe_ext.specs import moe_ext_gpt_block_spec
    from megatron_moe_ext.integration.model_config import MoEExtGPTModelBuilder, MoEExtGPTModelConfig

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        )
    model_parallel_cuda_manual_seed(args.seed)
    set_args(args)  # the builder (upcycling check) and a few Megatron helpers read the global args
    config = config_from_args(args)
    model_cfg = gpt_config_from_args(args, config=config, model_config_cls=MoEExtGPTModelConfig)
    if model_cfg.transformer_layer_spec is None:
        model_cfg.transformer_layer_spec = moe_ext_gpt_block_spec
    model = MoEExtGPTModelBuilder(model_cfg).build_model(ProcessGroupCollection.use_mpu_process_groups())
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def load_model(iter_dir: str, args: argparse.Namespace) -> torch.nn.Module:
    """Build the model of ``args`` (from :func:`analysis_args`) on this rank and load ``iter_dir``'s weights.

    Needs torch.distributed initialised with ``args.world_size`` ranks; initialises Megatron's model-parallel
    groups for the analysis layout."""
    from megatron.core import dist_checkpointing

    model = build_model(args)
    # The metadata megatron.training saved the model with (its sharded keys depend on it).
    sharded = model.sharded_state_dict(metadata={"singleton_local_shards": False})
    state = dist_checkpointing.load({"model": sharded}, iter_dir)
    result = model.load_state_dict(state["model"], strict=False)
    # Only Megatron's optional extra states (FP8 metadata and the like) may be absent.
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{iter_dir} does not fit the model rebuilt from its own arguments: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
    model.eval()
    return model
