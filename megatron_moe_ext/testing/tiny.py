"""Tiny Megatron GPT models for tests, and the bookkeeping for single-rank parity.

A parity test builds the same model once on one rank (the reference) and once at some parallelism,
copies the reference weights into the parallel shards, runs one forward/backward through Megatron's
own schedules, DDP and ``finalize_model_grads``, and compares each rank's gradient shards with the
matching slices of the reference gradients. ``ShardSpec`` says which slice a local parameter is.

Legend: B micro-batch size, S sequence length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_moe_ext.config import MoEExtConfig
from megatron_moe_ext.specs import moe_ext_gpt_block_spec

VOCAB_SIZE = 64
SEQ_LEN = 16


def tiny_config(**overrides: Any) -> MoEExtConfig:
    """A 2-layer MoE GPT config (4 experts, top-2), fp32, no dropout, CPU-safe options; Megatron's
    own experts unless ``moe_expert_backend`` says otherwise."""
    values: dict[str, Any] = dict(
        num_layers=2,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        pipeline_dtype=torch.float32,
        init_method_std=0.05,
        moe_expert_backend="megatron",
    )
    values.update(overrides)
    if values.get("moe_granularity") is not None:
        # Derived from G: drop the tiny defaults unless the caller set them (a conflict is an error).
        for derived in ("num_moe_experts", "moe_router_topk"):
            if derived not in overrides:
                values.pop(derived)
    return MoEExtConfig(**values)


def parallel_sizes(*, tp: int = 1, pp: int = 1, ep: int = 1, etp: int = 1) -> dict[str, int]:
    """TransformerConfig fields for a parallel layout (Megatron validates SP and PP from them)."""
    return dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def initialize_parallel(*, tp: int = 1, pp: int = 1, ep: int = 1, etp: int = 1, seed: int = 1234) -> None:
    """Megatron's model-parallel groups on the already-initialised default group, plus RNG seeds."""
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    model_parallel_cuda_manual_seed(seed)


def build_tiny_gpt(config: TransformerConfig, *, vocab_size: int = VOCAB_SIZE, seq_len: int = SEQ_LEN) -> GPTModel:
    """GPTModel for this rank's pipeline stage (vocabulary-parallel logits, as in training)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=moe_ext_gpt_block_spec(config),
        vocab_size=vocab_size,
        max_sequence_length=seq_len,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        position_embedding_type="rope",
    )


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """A local tensor is ``chunk(full, size, dim)[rank]``; gated fc1 chunks gate and up separately.
    ``expert`` adds a first split of a stacked expert tensor along its expert axis (EP)."""

    dim: int
    rank: int
    size: int
    gated: bool = False
    expert: tuple[int, int, int] | None = None  # (axis, ep_rank, ep_size)


def take_shard(full: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """The slice of ``full`` that ``spec`` describes (``full`` itself for replicated tensors)."""
    if spec is None:
        return full
    if spec.expert is not None:
        axis, rank, size = spec.expert
        full = torch.chunk(full, size, dim=axis)[rank]
    if spec.size == 1:
        return full
    if spec.gated:
        halves = torch.chunk(full, 2, dim=spec.dim)
        return torch.cat([torch.chunk(h, spec.size, dim=spec.dim)[spec.rank] for h in halves], dim=spec.dim)
    return torch.chunk(full, spec.size, dim=spec.dim)[spec.rank]


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def global_name(name: str, config: TransformerConfig, *, tied_embeddings: bool = True) -> str:
    """The reference (single-rank) name of a local parameter: global layer and expert indices."""
    offset = get_transformer_layer_offset(config)
    name = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)
    num_local = config.num_moe_experts // ps.get_expert_model_parallel_world_size() if config.num_moe_experts else 0
    first = ps.get_expert_model_parallel_rank() * num_local
    name = _LOCAL_EXPERT.sub(lambda m: f".local_experts.{int(m.group(1)) + first}.", name)
    if tied_embeddings and name == "output_layer.weight" and not ps.is_pipeline_first_stage():
        # The last stage's copy of tied embeddings (kept equal by finalize_model_grads).
        name = "embedding.word_embeddings.weight"
    return name


def shard_spec(name: str, param: torch.nn.Parameter, config: TransformerConfig) -> ShardSpec | None:
    """How this rank's ``param`` relates to the full reference tensor."""
    if not getattr(param, "tensor_model_parallel", False):
        expert_axis = getattr(param, "expert_axis", None)
        if expert_axis is None or getattr(param, "allreduce", True):
            return None
        # An expert-parallel table split along expert_axis only (e.g. PEER's u and v under EP).
        ep = (expert_axis, ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size())
        return ShardSpec(dim=expert_axis, rank=0, size=1, expert=ep)
    is_expert = not getattr(param, "allreduce", True)
    if is_expert:
        rank, size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    else:
        rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    gated = bool(config.gated_linear_unit) and name.endswith("linear_fc1.weight")
    expert_axis = getattr(param, "expert_axis", None)
    expert = None
    if expert_axis is not None:
        expert = (expert_axis, ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size())
    return ShardSpec(dim=param.partition_dim, rank=rank, size=size, gated=gated, expert=expert)


def load_reference_weights(model: GPTModel, full_state: dict[str, torch.Tensor]) -> None:
    """Copy the matching slices of a single-rank model's parameters into this rank's shards."""
    config = model.config
    tied = model.share_embeddings_and_output_weights
    with torch.no_grad():
        for name, param in model.named_parameters():
            full = full_state[global_name(name, config, tied_embeddings=tied)]
            param.copy_(take_shard(full, shard_spec(name, param, config)))


def wrap_ddp(model: GPTModel, *, distributed_optimizer: bool = False) -> DistributedDataParallel:
    """Megatron DDP as the training loop builds it (fp32 grads, no overlap)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed_optimizer
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def make_batches(num: int, batch_size: int, *, seed: int = 0, vocab_size: int = VOCAB_SIZE, seq_len: int = SEQ_LEN) -> list[dict[str, torch.Tensor]]:
    """``num`` micro-batches of random tokens (labels are tokens shifted by one)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        data_BS = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
        out.append(
            {
                "tokens": data_BS[:, :-1].contiguous(),
                "labels": data_BS[:, 1:].contiguous(),
                "position_ids": torch.arange(seq_len).expand(batch_size, seq_len).contiguous(),
            }
        )
    return out


def data_parallel_slice(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This data-parallel rank's rows of a global micro-batch."""
    rank, size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    return {k: torch.chunk(v, size, dim=0)[rank].contiguous() for k, v in batch.items()}


def _forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module):
    batch = next(data_iterator)
    loss_BS = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output_tensor: torch.Tensor):
        loss = output_tensor.float().mean()
        return loss, {"loss": loss.detach()}

    return loss_BS, loss_func


def forward_backward(
    model: DistributedDataParallel, batches: list[dict[str, torch.Tensor]], *, seq_len: int = SEQ_LEN
) -> list[float]:
    """One forward/backward over ``batches`` (micro-batches) with Megatron's schedule and
    ``finalize_model_grads``; returns the per-micro-batch losses seen on the last stage."""
    config = model.config
    if config.finalize_model_grads_func is None:  # keep a hook the config installed (bias balancing)
        config.finalize_model_grads_func = finalize_model_grads
    model.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=seq_len,
        micro_batch_size=batches[0]["tokens"].shape[0],
        forward_only=False,
    )
    return [float(d["loss"]) for d in losses] if losses else []


def gradient_shards(model: DistributedDataParallel) -> dict[str, tuple[torch.Tensor, ShardSpec | None]]:
    """Each local parameter's reduced gradient, keyed by reference name, with its shard spec."""
    inner: GPTModel = model.module
    config = inner.config
    tied = inner.share_embeddings_and_output_weights
    out = {}
    for name, param in inner.named_parameters():
        grad = param.main_grad if getattr(param, "main_grad", None) is not None else param.grad
        out[global_name(name, config, tied_embeddings=tied)] = (
            grad.detach().clone().float(),
            shard_spec(name, param, config),
        )
    return out


def full_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, S, V] of a single-stage model, the vocabulary gathered over tensor parallelism."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    with torch.no_grad():
        logits_BSV = model(batch["tokens"], batch["position_ids"], None)
        return gather_from_tensor_model_parallel_region(logits_BSV).float()

