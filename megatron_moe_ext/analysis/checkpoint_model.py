"""A trained model back from its torch_dist checkpoint, for analysis: at any TP/EP, on CPU or GPU.

Megatron saves the whole validated argument namespace (ours included, since our flags live in its parser) in
the checkpoint's common state. We rebuild the model from that namespace with only the runtime settings replaced
(parallel sizes, batch, precision on CPU), build it through the same config class, GPT builder and layer specs
the train entry uses, and load the weights with Megatron's ``dist_checkpointing``, which reshards whatever
TP/EP the checkpoint was saved with. Nothing of the optimizer is read.

Two halves: the launcher half (:func:`resolve_iteration`, :func:`read_checkpoint_args`,
:func:`routed_layers`) needs no process group and validates before any rank starts; the rank half
(``checkpoint.model.load_model``, with :func:`analysis_args`) runs inside an initialised process group.
"""

from __future__ import annotations

import argparse
import copy

import torch

from megatron_moe_ext.checkpoint.torch_dist import read_args, resolve_iteration  # noqa: F401 (re-exported)
from megatron_moe_ext.settings.peer import peer_layer_numbers


def read_checkpoint_args(iter_dir: str) -> argparse.Namespace:
    """The training run's Megatron argument namespace, from the checkpoint's common state."""
    return read_args(iter_dir)


def routed_layers(args: argparse.Namespace) -> dict[int, str]:
    """1-based layer number -> 'moe' or 'peer' for every layer that routes tokens to experts."""
    from megatron_moe_ext.args import saved_arg

    layers: dict[int, str] = {}
    if args.num_experts is not None:
        freq = saved_arg(args, "moe_layer_freq")
        pattern = [1 if i % freq == 0 else 0 for i in range(args.num_layers)] if isinstance(freq, int) else list(freq)
        layers.update({i + 1: "moe" for i, is_moe in enumerate(pattern) if is_moe})
    if saved_arg(args, "moe_peer_num_experts"):
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
    from megatron_moe_ext.args import saved_arg

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
    if saved_arg(a, "moe_peer_num_experts"):
        # PEER tables shard over EP, over TP, or not at all; follow the analysis layout, not the training one.
        a.moe_peer_shard = "ep" if ep > 1 and tp == 1 else "tp"
    if saved_arg(a, "moe_peer_subkey_loss_stride") > 1 and not hasattr(a, "moe_peer_subkey_loss_marginals"):
        # Saved before --moe-peer-subkey-loss-marginals existed, when a stride thinned the (then only) full
        # marginals; the new default 'candidates' refuses a stride.
        a.moe_peer_subkey_loss_marginals = "full"
    if not torch.cuda.is_available():
        a.bf16 = a.fp16 = False
        a.params_dtype = torch.float32
        a.transformer_impl = "local"
        a.gradient_accumulation_fusion = False
    return a


def model_facts(args: argparse.Namespace):
    """The facts the intervention checks need (``interventions_options.ModelFacts``), from the saved arguments."""
    from megatron_moe_ext.analysis.interventions_options import ModelFacts
    from megatron_moe_ext.args import saved_arg

    return ModelFacts(layers=routed_layers(args), num_experts=args.num_experts,
                      topk=args.moe_router_topk if args.num_experts is not None else None,
                      router_type=str(saved_arg(args, "moe_router_type") or "topk"),
                      peer_num_experts=saved_arg(args, "moe_peer_num_experts"))
