"""A trained model back from its torch_dist checkpoint, for analysis: at any TP/EP, on CPU or GPU.

Megatron saves the whole validated argument namespace (ours included, since our flags live in its parser) in
the checkpoint's common state. We rebuild the model from that namespace with only the runtime settings replaced
(parallel sizes, batch, precision on CPU), build it through the same config class, GPT builder and layer specs
the train entry uses, and load the weights with Megatron's ``dist_checkpointing``, which reshards whatever
TP/EP the checkpoint was saved with. Nothing of the optimizer is read.

Two halves: the launcher half (:func:`resolve_iteration`, :func:`read_checkpoint_args`,
:func:`routed_layers`) needs no process group and validates before any rank starts; the rank half
(:func:`load_model`) runs inside an initialised process group.
"""

from __future__ import annotations

import argparse
import copy

import torch

from megatron_moe_ext.checkpoint.torch_dist import read_args, resolve_iteration  # noqa: F401 (re-exported)
from megatron_moe_ext.peer_settings import peer_layer_numbers


def read_checkpoint_args(iter_dir: str) -> argparse.Namespace:
    """The training run's Megatron argument namespace, from the checkpoint's common state."""
    return read_args(iter_dir)


def routed_layers(args: argparse.Namespace) -> dict[int, str]:
    """1-based layer number -> 'moe' or 'peer' for every layer that routes tokens to experts."""
    layers: dict[int, str] = {}
    if args.num_experts is not None:
        freq = getattr(args, "moe_layer_freq", 1)
        pattern = [1 if i % freq == 0 else 0 for i in range(args.num_layers)] if isinstance(freq, int) else list(freq)
        layers.update({i + 1: "moe" for i, is_moe in enumerate(pattern) if is_moe})
    if getattr(args, "moe_peer_num_experts", None):
        layers.update({n: "peer" for n in peer_layer_numbers(args.moe_peer_layers, args.num_layers)})
    return dict(sorted(layers.items()))


def check_layout(args: argparse.Namespace, *, tp: int, ep: int, world_size: int) -> None:
    """ValueError unless the analysis layout fits the world and the model."""
    if tp < 1 or ep < 1 or world_size < 1:
        raise ValueError(f"--tp {tp}, --ep {ep}, --nproc {world_size}: each must be >= 1")
    if world_size % tp or world_size % ep:
        raise ValueError(f"--nproc {world_size} is not a multiple of --tp {tp} and of --ep {ep}; fix: --nproc a "
                         f"common multiple (analysis uses no pipeline or context parallelism)")
    if args.num_experts is not None and args.num_experts % ep:
        raise ValueError(f"the checkpoint's {args.num_experts} experts do not split over --ep {ep}; fix: an --ep "
                         f"dividing {args.num_experts}")


def analysis_args(args: argparse.Namespace, *, tp: int, ep: int, world_size: int, rank: int,
                  micro_batch_size: int) -> argparse.Namespace:
    """The checkpoint's namespace with the runtime replaced: the analysis layout, no pipeline/context parallelism,
    fp32 on CPU (bf16 matmuls there are slow and add nothing to routing statistics), no optimizer."""
    a = copy.copy(args)
    a.tensor_model_parallel_size = tp
    a.pipeline_model_parallel_size = 1
    a.virtual_pipeline_model_parallel_size = None
    a.context_parallel_size = 1
    a.expert_model_parallel_size = ep
    a.expert_tensor_parallel_size = 1
    # Derived from the parallel sizes by Megatron's validate_args; let the config re-derive them.
    a.tensor_parallel_num_weight_shards, a.gtp_weight_remat_size = None, 1
    a.expert_tensor_parallel_num_weight_shards, a.expert_gtp_weight_remat_size = None, 1
    # Megatron: MoE with TP needs sequence parallelism; without TP it must be off.
    a.sequence_parallel = tp > 1
    a.world_size, a.rank = world_size, rank
    a.data_parallel_size = world_size // tp
    a.micro_batch_size = micro_batch_size
    a.global_batch_size = micro_batch_size * a.data_parallel_size
    a.use_distributed_optimizer = False
    a.recompute_granularity = None
    a.recompute_method = None
    a.load, a.save, a.pretrained_checkpoint = None, None, None
    if getattr(a, "moe_peer_num_experts", None):
        # PEER tables shard over EP, over TP, or not at all; follow the analysis layout, not the training one.
        a.moe_peer_shard = "ep" if ep > 1 and tp == 1 else "tp"
    if (getattr(a, "moe_peer_subkey_loss_stride", 1) or 1) > 1 and not hasattr(a, "moe_peer_subkey_loss_marginals"):
        # Saved before --moe-peer-subkey-loss-marginals existed, when a stride thinned the (then only) full
        # marginals; the new default 'candidates' refuses a stride.
        a.moe_peer_subkey_loss_marginals = "full"
    if not torch.cuda.is_available():
        a.bf16 = a.fp16 = False
        a.params_dtype = torch.float32
        a.transformer_impl = "local"
        a.gradient_accumulation_fusion = False
    return a


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
    from megatron_moe_ext.training.model_config import (
        MoEExtGPTModelBuilder,
        MoEExtGPTModelConfig,
    )

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
