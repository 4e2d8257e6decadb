"""``FineGrainedExperts``: Megatron's experts slot, fast for many small experts.

Megatron's SequentialMLP runs one module (two Linear layers) per expert: at granularity 64 that
is hundreds of tiny matmuls plus Python overhead per layer. Here all local experts live in two
stacked parameters, ``linear_fc1.weight [E_local, F1, H]`` and ``linear_fc2.weight [E_local, H, F]``
(with ``add_bias_linear``, Megatron's default, also ``linear_fc1.bias [E_local, F1]`` and
``linear_fc2.bias [E_local, H]``, zero-initialised as Megatron's Linear layers do), and one kernel
call computes them all (``kernels/expert_mlp.py``, chosen by name; with ``--moe-fp8-format``,
``kernels/fp8_experts.expert_mlp_fp8`` instead, in training and eval alike, docs/fp8.md).

Contract (megatron/core/transformer/moe/moe_layer.py, experts call): input rows grouped by local
expert, ``tokens_per_expert`` counts (a CPU tensor for the allgather/alltoall dispatchers), the
routing probabilities applied by the experts after the activation AND to the fc2 bias
(SequentialMLP's ``MLP.forward`` with ``per_token_scale``: ``output += output_bias * probs``; the fc1
bias is added before the activation, unscaled), ``(output, None)`` returned (as SequentialMLP: the
bias is already in the output); expert parameters carry ``allreduce=False`` so DDP reduces them over
the expert-data-parallel group and the distributed optimizer keeps them in its expert optimizer.

Checkpoints: ``sharded_state_dict`` writes the keys and global shapes of SequentialMLP
(``...experts.experts.linear_fc1.weight`` of global shape [E, F1, H] after Megatron's layer axis,
gate rows before up rows; ``...experts.experts.linear_fc1.bias`` [E, F1], ``linear_fc2.bias`` [E, H]),
so a checkpoint moves between this module and Megatron's own experts, and between expert-parallel
sizes, at load time.

Legend: E local experts, H hidden, F expert hidden, F1 = F or 2F (gated), N routed rows.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe_ext.kernels.expert_mlp import get_expert_mlp_kernel
from megatron_moe_ext.kernels.fp8_experts import expert_mlp_fp8
from megatron_moe_ext.settings import ext_settings


class _StackedLinear(torch.nn.Module):
    """Holds one stacked weight (and bias) so state-dict keys read ``linear_fc1.weight`` like Megatron's."""

    def __init__(self, weight: torch.nn.Parameter, bias: torch.nn.Parameter | None) -> None:
        super().__init__()
        self.weight = weight
        self.register_parameter("bias", bias)


class FineGrainedExperts(MegatronModule):
    """All local experts of one MoE layer as two stacked weights (see the module docstring)."""

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        pg_collection: ProcessGroupCollection | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(config=config)
        # Checked before any rank starts on the flag path (settings/experts.py); here for configs
        # built in code.
        settings = ext_settings(config).experts
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.ep_group = pg_collection.ep
        self.dp_group = pg_collection.expt_dp
        if pg_collection.expt_tp.size() != 1:
            raise ValueError(
                f"FineGrainedExperts needs expert tensor parallel size 1 (got {pg_collection.expt_tp.size()}): "
                "fine-grained experts are too small to split; fix: --expert-tensor-parallel-size 1"
            )
        self.num_local_experts = num_local_experts
        hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
        fc1_rows = 2 * ffn if config.gated_linear_unit else ffn
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        w1 = torch.empty(num_local_experts, fc1_rows, hidden, dtype=config.params_dtype, device=device)
        w2 = torch.empty(num_local_experts, hidden, ffn, dtype=config.params_dtype, device=device)
        if config.perform_initialization:
            # The expert RNG stream differs per EP rank, so different experts get different weights.
            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                for e in range(num_local_experts):
                    config.init_method(w1[e])
                    config.output_layer_init_method(w2[e])
        b1 = b2 = None
        if settings.bias:
            b1 = torch.empty(num_local_experts, fc1_rows, dtype=config.params_dtype, device=device)
            b2 = torch.empty(num_local_experts, hidden, dtype=config.params_dtype, device=device)
            if config.perform_initialization:  # Megatron's Linear layers: "Always initialize bias to zero"
                b1.zero_()
                b2.zero_()
        self.linear_fc1 = _StackedLinear(torch.nn.Parameter(w1), None if b1 is None else torch.nn.Parameter(b1))
        self.linear_fc2 = _StackedLinear(torch.nn.Parameter(w2), None if b2 is None else torch.nn.Parameter(b2))
        # The attributes of SequentialMLP's parameters, on the stacked axes: fc1 (column-parallel)
        # weight and bias and fc2's weight are tensor-model-parallel, fc2's (row-parallel) bias is
        # not. (fc2's bias gets no ``sequence_parallel`` mark, which RowParallelLinear gives it: with
        # expert TP 1 its gradient is complete after the expert-data-parallel reduction, which
        # spans the TP ranks; finalize_model_grads would add it up over TP a second time.)
        for param, partition_dim in ((self.linear_fc1.weight, 1), (self.linear_fc2.weight, 2),
                                     (self.linear_fc1.bias, 1), (self.linear_fc2.bias, None)):
            if param is None:
                continue
            param.allreduce = False  # expert grads are reduced over expert-data-parallel ranks only
            if partition_dim is not None:
                param.tensor_model_parallel = True
                param.partition_dim = partition_dim
                param.partition_stride = 1
            param.expert_axis = 0  # axis of the stacked tensor that indexes experts
        self._register_load_state_dict_pre_hook(self._drop_extra_state)
        self.backend = settings.backend
        # FP8 (--moe-fp8-format) replaces the backend's kernel, in training and eval alike.
        self._kernel = (functools.partial(expert_mlp_fp8, recipe=settings.fp8_recipe, fp8_format=settings.fp8_format)
                        if settings.fp8 else get_expert_mlp_kernel(self.backend))

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        """Megatron's MLP activation (mlp.py, the unfused path; the fused kernels compute the same):
        for GLUs ``act(clamp(gate)) * (clamp(up) + glu_linear_offset)``, with the optional
        ``activation_func_clamp_value``."""
        config = self.config
        act = config.activation_func
        if config.gated_linear_unit:
            gate, up = torch.chunk(h, 2, dim=-1)
            if (clamp := config.activation_func_clamp_value) is not None:
                gate = gate.clamp(min=None, max=clamp)
                up = up.clamp(min=-clamp, max=clamp)
            if config.glu_linear_offset:
                up = up + config.glu_linear_offset
            return act(gate) * up
        return act(h)

    def forward(
        self,
        permuted_local_hidden_states: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        permuted_probs: torch.Tensor,
        **unused: object,
    ) -> tuple[torch.Tensor, None]:
        """Rows grouped by local expert -> expert outputs, probabilities and biases applied."""
        x_NH, probs_N = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            x_NH = (probs_N.unsqueeze(-1) * x_NH).to(x_NH.dtype)
            probs_N = torch.ones_like(probs_N)
        if x_NH.shape[0] == 0:
            return self._empty_output(x_NH, probs_N), None
        counts = tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor) else list(tokens_per_expert)
        out_NH = self._kernel(
            x_NH, counts, self.linear_fc1.weight, self.linear_fc2.weight, probs_N, self._activation,
            b1_EF1=self.linear_fc1.bias, b2_EH=self.linear_fc2.bias,
        )
        return out_NH, None

    def _empty_output(self, x_NH: torch.Tensor, probs_N: torch.Tensor) -> torch.Tensor:
        """[0, H] computed from the (empty) input and the weights, so it stays in the autograd graph.

        When this EP rank receives no tokens, the dispatcher's combine all-to-all must still run in
        backward here, as on the other ranks; a fresh zeros tensor would cut the graph and leave the
        other ranks waiting in a mismatched collective (seen as a gloo size error in training).
        """
        w1_F1H, w2_HF = self.linear_fc1.weight[0], self.linear_fc2.weight[0]
        b1, b2 = self.linear_fc1.bias, self.linear_fc2.bias
        h_NF = self._activation(torch.nn.functional.linear(x_NH, w1_F1H, None if b1 is None else b1[0]))
        h_NF = (h_NF * probs_N.unsqueeze(-1)).to(h_NF.dtype)
        out_NH = torch.nn.functional.linear(h_NF, w2_HF)
        if b2 is not None:
            out_NH = (out_NH + b2[0] * probs_N.unsqueeze(-1)).to(out_NH.dtype)
        return out_NH

    def backward_dw(self) -> None:
        """No deferred weight-gradient computation (called by Megatron's delayed-wgrad schedule)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """SequentialMLP's checkpoint keys and global shapes, one shard per EP rank."""
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        num_global = ep_size * self.num_local_experts
        first = ep_rank * self.num_local_experts
        prepend = len(sharded_offsets)
        # Replicas: every (pipeline-independent) copy of this EP shard across TP and expert-DP.
        replica_id = (0, 0, self.dp_group.rank())
        sharded: dict = {}
        for name in ("linear_fc1", "linear_fc2"):
            # Weights and biases: SequentialMLP's per-expert tensors with the expert axis in front
            # (a gated fc1's [gate; up] halves, which it saves as two pieces, are contiguous here).
            for attr in ("weight", "bias"):
                param = getattr(getattr(self, name), attr)
                if param is None:
                    continue
                sharded[f"{prefix}{name}.{attr}"] = ShardedTensor.from_rank_offsets(
                    f"{prefix}experts.{name}.{attr}",
                    param,
                    *sharded_offsets,
                    (prepend, ep_rank, ep_size),
                    replica_id=replica_id,
                    prepend_axis_num=prepend,
                )
            # SequentialMLP's Linear layers also save (empty) extra state per expert; writing it
            # keeps checkpoints loadable by Megatron's own experts.
            layer_shape = tuple(s[2] for s in sharded_offsets)
            layer_offset = tuple(s[1] for s in sharded_offsets)
            for e in range(self.num_local_experts):
                sharded[f"{prefix}local_experts.{e}.{name}._extra_state"] = ShardedObject(
                    f"{prefix}experts.{name}._extra_state",
                    None,
                    (*layer_shape, num_global),
                    (*layer_offset, first + e),
                    replica_id=replica_id,
                )
        return sharded

    @staticmethod
    def _drop_extra_state(state_dict, prefix, *args) -> None:
        # The per-expert extra-state entries exist only for SequentialMLP compatibility.
        for key in [k for k in state_dict if k.startswith(f"{prefix}local_experts.") and k.endswith("._extra_state")]:
            del state_dict[key]

