"""``PEERLayer``: a transformer layer's MLP replaced by a million single-neuron experts retrieved by
product keys (He 2024, "Mixture of A Million Experts", arXiv 2407.04153).

Math (../shared/notes/algorithms.md sections 2-3). Each head h has its own query
q_h = norm(W_q x)_h (D = key_dim) and sub-key tables C_h, C'_h (n keys of D/2 each); the exact
top-k experts of head h over the shared n x n grid come from the product-key core
(``kernels/product_keys.py``, the one the router uses), gates are softmax (or sigmoid) over the
head's k scores in fp32, and

    f(x) = sum_h sum_{e in I_h} g_h,e * act(u_e . x) * v_e   (+ an optional dense MLP branch)

with u, v two N x hidden tables. All heads share the pool, so G = heads * k experts per token.
The experts' compute is a backend of ``kernels/peer_experts.py`` chosen by name.

Biases (``add_bias_linear``, Megatron's default). The query projection is a linear layer and gets
its bias: q = norm(W_q x + b_q), ``query_bias`` [H*D], same dtype as ``query_weight``, replicated and
``sequence_parallel`` like it, zero-initialised (Megatron's linear-layer convention; a random b_q
would push every token's query the same way at step 0). Under the batch-norm query norm b_q is
cancelled by the batch mean (zero gradient, it stays at zero). The single-neuron experts get no
bias: PEER's expert is act(u_e . x) v_e, a neuron, not a linear layer (a bias per expert would be
two more N-row tables). The dense branch is Megatron's MLP and has its biases from Megatron. Without
add_bias_linear there is no ``query_bias`` (checkpoints of such runs load as before).

Parallelism, through Megatron's own process groups (like its row-parallel layers):
- shard 'tp': u and v split by expert id over the tensor-parallel group (tagged
  ``tensor_model_parallel``, partition_dim 0). Each rank computes the contributions of its own
  experts for all tokens it sees and the partial outputs are summed: all-reduce without sequence
  parallelism, reduce-scatter with it (tokens all-gathered first).
- shard 'ep': u and v split over the expert-parallel group (``allreduce=False``: DDP reduces them
  over expert-data-parallel ranks). Tokens, gates and ids are all-gathered within the EP group,
  partial outputs reduce-scattered back.
- Retrieval (query weight and bias, sub-keys, query norm) is replicated. It runs on the rank's own tokens
  and only the selected gates travel; the gates' gradient comes back summed over the shard group
  (all-reduce or reduce-scatter), so retrieval gradients are those of one rank: identical on TP
  ranks without SP, partial (tagged ``sequence_parallel``, all-reduced by finalize_model_grads)
  with SP, data-parallel otherwise.
- Tables are padded to ceil(N / shards) rows per rank (checkpoints: equal shards, shape mismatch
  allowed on load, like Megatron's padded vocabulary); padded rows are never selected.

Legend: S sequence, B micro-batch, T tokens (S*B local), h hidden, H heads, k top-k per head,
K = H*k, D key dim, n sub-keys per side, N experts, R table rows on this rank, P selected pairs.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import log_single_rank

from megatron_moe_ext.balancing.peer import PEERBalancing
from megatron_moe_ext.kernels.peer_experts import peer_experts
from megatron_moe_ext.kernels.peer_reference import peer_gates, uniform_offsets
from megatron_moe_ext.kernels.product_keys import product_key_topk_with_candidates
from megatron_moe_ext.layers.query_norm import QueryNorm
from megatron_moe_ext.settings import ext_settings
from megatron_moe_ext.settings.peer import check_peer_parallel, table_shard
from megatron_moe_ext.kernels.huge_pages import empty_huge

TABLE_NAMES = ("u", "v")
logger = logging.getLogger(__name__)


def local_mlp_builder():
    """Megatron's dense MLP with its local (non-TE) tensor-parallel linears, as an MLP-slot builder."""
    import functools

    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    return functools.partial(
        MLP.as_mlp_submodule, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    )


class PEERLayer(MegatronModule):
    """Megatron MLP-slot module (``TransformerLayerSubmodules.mlp``): forward(hidden [S, B, h],
    padding_mask [B, S] True = padding) -> (out [S, B, h], None).

    Settings from the config's ``PEERSettings`` (``ext_settings(config).peer``, the ``moe_peer_*``
    fields); ``shared_mlp`` builds the optional dense branch (Megatron's MLP, given
    ``ffn_hidden_size``) when moe_peer_shared_ffn_hidden_size is set.
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection: ProcessGroupCollection | None = None,
        is_mtp_layer: bool = False,
        name: str | None = None,
        shared_mlp=None,
    ) -> None:
        super().__init__(config=config)
        # Called as observer(layer, x_Th, ids_TK, gates_TK) after retrieval when set; a forward hook cannot see
        # the selections (the layer returns only its output), and analysis must not recompute them.
        self.routing_observer = None
        ext = ext_settings(config)
        settings = ext.peer
        if settings.layout is None:
            raise ValueError("PEERLayer needs PEER settings (moe_peer_num_experts is unset); fix: --moe-peer-num-experts "
                             "(a perfect square, e.g. 1048576)")
        self.layout = settings.layout
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.shard_mode = settings.shard
        check_peer_parallel(shard=self.shard_mode, tp=pg_collection.tp.size(), ep=pg_collection.ep.size())
        self.tp_group = pg_collection.tp
        self.dp_cp_group = pg_collection.dp_cp
        self.expt_tp_group, self.expt_dp_group = pg_collection.expt_tp, pg_collection.expt_dp
        self.shard_group = pg_collection.tp if self.shard_mode == "tp" else pg_collection.ep
        shards = self.shard_group.size()
        self.shard = table_shard(self.layout.num_experts, self.shard_group.rank(), shards)
        if self.shard.rows * shards != self.layout.num_experts:
            log_single_rank(
                logger, logging.INFO,
                f"PEER: {self.layout.num_experts} experts over {shards} {self.shard_mode.upper()} ranks: "
                f"{self.shard.rows} table rows per rank, the last {self.shard.rows * shards - self.layout.num_experts} "
                "padding (never selected; checkpoints store the padded table and load at any other split)",
            )
        sp = bool(config.sequence_parallel) and pg_collection.tp.size() > 1
        # Tokens differ across the shard group (sequence shards, or EP = data-parallel ranks).
        self.tokens_distinct = shards > 1 and (self.shard_mode == "ep" or sp)
        self.sequence_parallel = sp
        self.activation = settings.activation
        self.gate = settings.gate
        self.backend = settings.backend
        self.chunk_pairs = settings.chunk_pairs
        self.deterministic = settings.deterministic
        self.layer_number: int | None = None

        H, D, n, hidden = self.layout.heads, self.layout.key_dim, self.layout.grid, config.hidden_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        dtype = config.params_dtype
        self.query_weight = torch.nn.Parameter(torch.empty(H * D, hidden, dtype=dtype, device=device))
        # q = W_q x + b_q with Megatron's add_bias_linear (module docstring: zero init, no expert biases).
        self.query_bias = (
            torch.nn.Parameter(torch.zeros(H * D, dtype=dtype, device=device)) if config.add_bias_linear else None
        )
        self.row_keys = torch.nn.Parameter(torch.empty(H, n, D // 2, dtype=dtype, device=device))
        self.col_keys = torch.nn.Parameter(torch.empty(H, n, D // 2, dtype=dtype, device=device))
        # Batch statistics over the ranks holding distinct tokens: with SP the TP shards too; without
        # it TP ranks hold copies, which must not be counted twice (backward would sum copies).
        self.query_norm = QueryNorm(
            settings.query_norm, H, D,
            stats_group=pg_collection.tp_dp_cp if sp else pg_collection.dp_cp, sequence_parallel=sp,
        )
        # Huge pages on CPU: the tables are read at random rows (runtime/huge_pages.py).
        self.u = torch.nn.Parameter(empty_huge((self.shard.rows, hidden), dtype=dtype, device=device))
        self.v = torch.nn.Parameter(empty_huge((self.shard.rows, hidden), dtype=dtype, device=device))
        for param in (self.query_weight, self.query_bias, self.row_keys, self.col_keys):
            if param is not None:
                param.sequence_parallel = sp
        for table in (self.u, self.v):
            table.peer_table = True  # picked up by the optimizer overrides (lr / weight-decay multipliers)
            if self.shard_mode == "tp":
                table.tensor_model_parallel = True
                table.partition_dim = 0
                table.partition_stride = 1
            else:
                table.allreduce = False  # expert grads: reduced over expert-data-parallel ranks
                table.expert_axis = 0
        self.reset_parameters()
        # --moe-balance-losses subkey / --moe-balance-metrics (balancing/peer.py). Loss counts over the
        # ranks holding other tokens of the same sequences, step load over all ranks with distinct tokens.
        balancing = PEERBalancing(
            config, balance=ext.balance, peer=settings, heads=H, grid=n, topk=self.layout.topk, num_experts=self.layout.num_experts,
            loss_group=pg_collection.tp_cp if sp else pg_collection.cp,
            count_group=pg_collection.tp_dp_cp if sp else pg_collection.dp_cp,
            cp_size=pg_collection.cp.size(), is_mtp_layer=is_mtp_layer,
        )
        self.balancing = balancing if balancing.enabled else None
        self.shared_mlp = None
        shared_size = settings.shared_ffn_hidden_size
        if shared_size:
            if shared_mlp is None:
                shared_mlp = local_mlp_builder()
            # Megatron's MLP sizes fc2 from config.ffn_hidden_size (as SharedExpertMLP, use a copy).
            shared_config = copy.copy(config)
            shared_config.ffn_hidden_size = shared_size
            self.shared_mlp = shared_mlp(
                config=shared_config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, ffn_hidden_size=shared_size
            )

    def reset_parameters(self) -> None:
        if not self.config.perform_initialization:
            return
        with torch.no_grad():
            self.config.init_method(self.query_weight)
            if self.query_bias is not None:
                self.query_bias.zero_()  # Megatron's linear-layer convention
            # Unit-variance half scores for unit-RMS queries.
            std = (self.layout.key_dim // 2) ** -0.5
            self.row_keys.normal_(std=std)
            self.col_keys.normal_(std=std)
            # Different experts on different ranks: TP ranks fork the model-parallel stream, EP
            # ranks the expert stream (Megatron's convention for sharded weights).
            tracker = get_expert_parallel_rng_tracker_name() if self.shard_mode == "ep" else None
            with get_cuda_rng_tracker().fork(*([tracker] if tracker else [])):
                self.config.init_method(self.u)
                self.config.output_layer_init_method(self.v)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number
        if self.balancing is not None:
            self.balancing.layer_number = layer_number

    # -- retrieval -----------------------------------------------------------------------------
    def retrieve(self, x_Th: torch.Tensor, valid_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Global expert ids_TK (int64, heads in order, each head's k sorted by score) and fp32 gates_TK."""
        H, D, k = self.layout.heads, self.layout.key_dim, self.layout.topk
        bias = self.query_bias.to(x_Th.dtype) if self.query_bias is not None else None
        q_THD = torch.nn.functional.linear(x_Th, self.query_weight.to(x_Th.dtype), bias).view(-1, H, D)
        q_THD = self.query_norm(q_THD, valid_T).float()
        subkeys = (self.row_keys.float(), self.col_keys.float())
        # The per-side candidates feed the default subkey loss (its gradient joins their sparse backward).
        scores_THk, ids_THk, candidates = product_key_topk_with_candidates(
            q_THD, subkeys, k, subkey_topk=self.layout.subkey_topk
        )
        gates_THk = peer_gates(scores_THk, self.gate)
        T = x_Th.shape[0]
        gates_TK = gates_THk.reshape(T, H * k)
        if self.balancing is not None and self.balancing.active():
            # Balance loss attached to the gates (Megatron's aux-loss autoscaler), step load counted.
            gates_TK = self.balancing(q_THD, subkeys, candidates, ids_THk, valid_T, gates_TK)
        return ids_THk.reshape(T, H * k), gates_TK

    # -- experts -------------------------------------------------------------------------------
    def _experts(self, x_Th: torch.Tensor, ids_P: torch.Tensor, gates_P: torch.Tensor, offsets_T1: torch.Tensor) -> torch.Tensor:
        return peer_experts(
            x_Th, self.u, self.v, ids_P, gates_P, offsets_T1, self.activation,
            backend=self.backend, chunk_pairs=self.chunk_pairs, deterministic=self.deterministic,
        )

    def _sharded_experts(self, x_Th: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
        """Contributions of this rank's experts, summed over the shard group."""
        group = self.shard_group
        if self.tokens_distinct:
            x_all = gather_from_sequence_parallel_region(x_Th, group=group)
            gates_all = gather_from_sequence_parallel_region(gates_TK, group=group)
            ids_all = _all_gather_rows(ids_TK, group)
        else:
            # Same tokens on every rank: partial input and gate gradients are all-reduced.
            x_all = copy_to_tensor_model_parallel_region(x_Th, group=group)
            gates_all = copy_to_tensor_model_parallel_region(gates_TK, group=group)
            ids_all = ids_TK
        own_TK = (ids_all >= self.shard.first) & (ids_all < self.shard.end)
        offsets_T1 = torch.zeros(own_TK.shape[0] + 1, dtype=torch.int64, device=x_Th.device)
        torch.cumsum(own_TK.sum(dim=1), dim=0, out=offsets_T1[1:])
        ids_P = (ids_all - self.shard.first)[own_TK]
        gates_P = gates_all[own_TK]
        partial_Th = self._experts(x_all, ids_P, gates_P, offsets_T1)
        if self.tokens_distinct:
            return reduce_scatter_to_sequence_parallel_region(partial_Th, group=group)
        return reduce_from_tensor_model_parallel_region(partial_Th, group=group)

    def forward(self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None, **unused) -> tuple[torch.Tensor, None]:
        S, B, h = hidden_states.shape
        x_Th = hidden_states.reshape(S * B, h)
        valid_T = self._valid_tokens(padding_mask, S, B)
        ids_TK, gates_TK = self.retrieve(x_Th, valid_T)
        if self.routing_observer is not None:  # routing analysis (analysis/routing_recorder.py)
            self.routing_observer(self, x_Th, ids_TK, gates_TK)
        if self.shard.shards == 1:
            offsets_T1 = uniform_offsets(x_Th.shape[0], ids_TK.shape[1], x_Th.device)
            out_Th = self._experts(x_Th, ids_TK.reshape(-1), gates_TK.reshape(-1), offsets_T1)
        else:
            out_Th = self._sharded_experts(x_Th, ids_TK, gates_TK)
        out_SBh = out_Th.view(S, B, h)
        if self.shared_mlp is not None:
            shared_SBh, shared_bias = self.shared_mlp(hidden_states)
            out_SBh = out_SBh + (shared_SBh if shared_bias is None else shared_SBh + shared_bias)
        return out_SBh, None

    def _valid_tokens(self, padding_mask: torch.Tensor | None, S: int, B: int) -> torch.Tensor | None:
        """True for real tokens, [S*B] in the layout of the local hidden states."""
        if padding_mask is None:
            return None
        pad_SB = padding_mask.transpose(0, 1).bool()  # the layer passes [B, S]
        if pad_SB.shape[0] != S and self.sequence_parallel:  # full sequence: keep this rank's slice
            rank = self.tp_group.rank()
            pad_SB = pad_SB[rank * S:(rank + 1) * S]
        return ~pad_SB.reshape(S * B)

    # -- checkpoints ---------------------------------------------------------------------------
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Replicated retrieval as Megatron's default; u and v as [N_padded, h] sharded by expert
        id, keys and shapes independent of the parallelism except the padding (mismatch allowed)."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        prepend = len(sharded_offsets)
        if self.shard_mode == "tp":
            replica_id = (0, 0, self.dp_cp_group.rank())
        else:
            replica_id = (0, self.expt_tp_group.rank(), self.expt_dp_group.rank())
        for name in TABLE_NAMES:
            sharded[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}{name}",
                getattr(self, name),
                *sharded_offsets,
                (prepend, self.shard_group.rank(), self.shard.shards),
                replica_id=replica_id,
                prepend_axis_num=prepend,
                allow_shape_mismatch=True,
            )
        return sharded


def _all_gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenation along dim 0 of every rank's ``tensor`` (no gradient: ids)."""
    parts = [torch.empty_like(tensor) for _ in range(group.size())]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)
