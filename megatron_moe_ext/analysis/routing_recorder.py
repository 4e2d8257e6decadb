"""Recording what a Megatron model routed: hooks on its routers and PEER layers, gathered on rank 0.

Megatron's routers (``TopKRouter`` and every subclass: ours, with product keys or balancing) return dense
``probs_TN`` and a boolean ``routing_map_TN``; a forward hook turns them into the top-k ``ids_TK`` (sorted by
gate, so column 0 is the top-1) and ``gates_TK``. A PEER layer never forms [T, N] (N can be 10^6): it calls its
``routing_observer`` with the selections it retrieved (head-major). Dense MLPs can be recorded too, as a
1-expert layer (top-1, gate 1: a dense FFN is exactly that), so that hidden states of dense and MoE models can be
compared layer by layer.

Routers with a variable number of experts per token (issue #22: expert choice, ReLU) are recorded with K = the
most a token can get (N for ReLU, N + M for expert choice), each row's selections first (by gate), the rest padded
with id -1 and gate 0 (``trace_format.EMPTY_SLOT``). Null experts (``--moe-null-experts M``) are recorded as ids
N..N+M-1 from the router's ``last_null_selection = (null_map_TM, null_probs_TM)``, which every router with null
experts stores each forward; the null gate is the router's probability of that null slot.

Every rank sees its own tokens: its data-parallel share of the batch and, under sequence parallelism, its slice
of the sequence. :meth:`RoutingRecorder.gather` puts them back in (sample, position) order on rank 0.

Legend: S sequence (S_loc: this rank's slice under SP), B micro-batch, T = S*B tokens, K selections per token,
N experts, D hidden size, R ranks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class RecordedLayer:
    """What one layer records: the trace's layer spec fields plus where its selections come from."""

    layer: int
    kind: str  # 'moe' (a router), 'peer' or 'dense'
    num_experts: int  # N real experts
    top_k: int  # K slots per row (variable: the most a token can get)
    num_heads: int
    hidden_size: int | None
    null_experts: int = 0  # M: ids N..N+M-1
    variable: bool = False  # rows may hold fewer than K selections (padded with -1, gate 0)


def selections_from_map(probs_TE: torch.Tensor, map_TE: torch.Tensor, k: int, *,
                        pad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_TK, gates_TK) of a dense router output: each row's selected columns ordered by gate (ties by id,
    as torch.topk breaks them). ``pad``: rows with fewer than K selections end in id -1, gate 0; else the
    K largest are taken (a row short of K, e.g. a padding token, is completed by unselected ids, gate 0)."""
    # Probabilities outside the routing map are zero; ranking by them inside the map gives the router's choice.
    masked_TE = torch.where(map_TE, probs_TE.float(), torch.full_like(probs_TE, -1.0, dtype=torch.float32))
    gates_TK, ids_TK = masked_TE.topk(k, dim=-1)
    gates_TK = gates_TK.clamp_min(0.0)
    if pad:
        chosen_TK = map_TE.gather(1, ids_TK)
        ids_TK = torch.where(chosen_TK, ids_TK, torch.full_like(ids_TK, -1))
        gates_TK = torch.where(chosen_TK, gates_TK, torch.zeros_like(gates_TK))
    return ids_TK, gates_TK


def _router_layer(module: torch.nn.Module, hidden: bool) -> RecordedLayer:
    """The record of a TopKRouter (or subclass): N real experts (``num_real_experts`` where the router's own
    config counts N + M), M null experts, and K: top-k, or the most a token can get for variable routers."""
    from megatron_moe_ext.settings import ext_settings

    router = ext_settings(module.config).router
    m = router.null_experts
    n = getattr(module, "num_real_experts", module.config.num_moe_experts)
    variable = router.router_type in ("expert_choice", "relu")
    k = n + m if variable else module.topk
    return RecordedLayer(_layer_number(module), "moe", n, k, 1, module.config.hidden_size if hidden else None,
                         null_experts=m, variable=variable)


def _layer_number(module: torch.nn.Module) -> int:
    number = getattr(module, "layer_number", None)
    if not isinstance(number, int):
        raise TypeError(f"{type(module).__name__} has no layer number; it was not built inside a transformer block")
    return number


class RoutingRecorder:
    """Hooks ``model``'s routing; after each forward :meth:`gather` returns rank 0's rows (None elsewhere).

    ``hidden``: record the MLP input (the router's input) of every recorded layer. ``dense``: also record
    dense MLP layers (as 1-expert layers), for comparing hidden states with dense models."""

    def __init__(self, model: torch.nn.Module, *, sequence_parallel: bool, hidden: bool = False,
                 dense: bool = False) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        from megatron_moe_ext.layers.peer import PEERLayer

        self.hidden = hidden
        self.sequence_parallel = sequence_parallel
        self.layers: dict[int, RecordedLayer] = {}
        self._local: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._handles: list[Any] = []
        self._peers: list[Any] = []
        for module in model.modules():
            if isinstance(module, TopKRouter):
                self._add(_router_layer(module, hidden))
                self._handles.append(module.register_forward_hook(self._router_hook))
            elif isinstance(module, PEERLayer):
                number = _layer_number(module)
                lay = module.layout
                self._add(RecordedLayer(number, "peer", lay.num_experts, lay.heads * lay.topk, lay.heads,
                                        module.config.hidden_size if hidden else None))
                module.routing_observer = self._peer_observer
                self._peers.append(module)
        if dense:
            for module in model.modules():
                mlp = getattr(module, "mlp", None)
                number = getattr(module, "layer_number", None)
                if mlp is None or not isinstance(number, int) or number in self.layers:
                    continue
                if any(isinstance(m, (TopKRouter, PEERLayer)) for m in mlp.modules()):
                    continue
                self._add(RecordedLayer(number, "dense", 1, 1, 1, module.config.hidden_size if hidden else None))
                self._handles.append(mlp.register_forward_pre_hook(self._dense_hook(number)))
        if not self.layers:
            raise ValueError("the model has no MoE router and no PEER layer to record; fix: analyse a checkpoint "
                             "trained with --num-experts or --moe-peer-num-experts (or record dense layers)")
        self.layers = dict(sorted(self.layers.items()))

    def _add(self, spec: RecordedLayer) -> None:
        if spec.layer in self.layers:
            raise ValueError(f"two routed modules claim layer {spec.layer}: multi-token-prediction layers are not "
                             f"recorded yet")
        self.layers[spec.layer] = spec

    # -- hooks (this rank's tokens, [S_loc * B] rows in Megatron's s-major order) -----------------------------
    def _router_hook(self, module: torch.nn.Module, inputs: tuple, output: tuple) -> None:
        spec = self.layers[_layer_number(module)]
        probs_TE, map_TE = output[0].float(), output[1].bool()
        if spec.null_experts:
            null = getattr(module, "last_null_selection", None)
            if null is None:
                raise RuntimeError(f"layer {spec.layer}: a router with {spec.null_experts} null experts stored no "
                                   "last_null_selection in this forward")
            null_map_TM, null_probs_TM = null
            probs_TE = torch.cat([probs_TE, null_probs_TM.float().to(probs_TE.device)], dim=-1)
            map_TE = torch.cat([map_TE, null_map_TM.bool().to(map_TE.device)], dim=-1)
        ids_TK, gates_TK = selections_from_map(probs_TE, map_TE, spec.top_k, pad=spec.variable)
        hidden_TD = inputs[0].reshape(-1, inputs[0].shape[-1]) if self.hidden else None
        self._local[spec.layer] = (ids_TK, gates_TK, hidden_TD)

    def _peer_observer(self, layer: torch.nn.Module, x_TD: torch.Tensor, ids_TK: torch.Tensor,
                       gates_TK: torch.Tensor) -> None:
        self._local[_layer_number(layer)] = (ids_TK, gates_TK.float(), x_TD if self.hidden else None)

    def _dense_hook(self, number: int):
        def hook(module: torch.nn.Module, inputs: tuple) -> None:
            x = inputs[0]
            T = x.numel() // x.shape[-1]
            ids_TK = torch.zeros(T, 1, dtype=torch.int64, device=x.device)
            gates_TK = torch.ones(T, 1, dtype=torch.float32, device=x.device)
            self._local[number] = (ids_TK, gates_TK, x.reshape(T, x.shape[-1]) if self.hidden else None)
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for peer in self._peers:
            peer.routing_observer = None
        self._handles, self._peers = [], []

    # -- gathering ---------------------------------------------------------------------------------------------
    def gather(self, micro_batch_size: int) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] | None:
        """This forward's rows of every recorded layer on rank 0, in (sample, position) order over the global
        batch (data-parallel rank major); None on other ranks. Collective: every rank must call it."""
        from megatron.core import parallel_state as ps

        missing = [n for n in self.layers if n not in self._local]
        if missing:
            raise RuntimeError(f"layers {missing} did not route in this forward (pipeline stages are not supported)")
        B = micro_batch_size
        payload = {}
        for number, (ids_TK, gates_TK, hidden_TD) in self._local.items():
            T = ids_TK.shape[0]
            if T % B:
                raise RuntimeError(f"layer {number}: {T} local tokens are not a multiple of micro-batch {B}")
            S_loc = T // B

            def bsk(x: torch.Tensor | None, dtype: Any, S_loc: int = S_loc) -> np.ndarray | None:
                # [S_loc*B, K] s-major -> [B, S_loc, K]
                if x is None:
                    return None
                return x.detach().to("cpu", dtype).reshape(S_loc, B, -1).transpose(0, 1).numpy().copy()

            payload[number] = (bsk(ids_TK, torch.int64), bsk(gates_TK, torch.float32), bsk(hidden_TD, torch.float32))
        self._local.clear()
        sp = ps.get_tensor_model_parallel_world_size() > 1 and self.sequence_parallel
        item = (ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank(), payload)
        world = torch.distributed.get_world_size()
        items = [None] * world if torch.distributed.get_rank() == 0 else None
        torch.distributed.gather_object(item, items, dst=0)
        if items is None:
            return None
        by_dp: dict[int, dict[int, Any]] = {}
        for dp, tp, data in items:
            if sp or tp == 0:  # without SP every TP rank holds the same rows
                by_dp.setdefault(dp, {})[tp] = data
        out = {}
        for number in self.layers:
            cols = []
            for i in range(3):
                parts_dp = []
                for dp in sorted(by_dp):
                    pieces = [by_dp[dp][tp][number][i] for tp in sorted(by_dp[dp])]
                    if pieces[0] is None:
                        break
                    parts_dp.append(np.concatenate(pieces, axis=1))  # SP slices are consecutive positions
                if not parts_dp:
                    cols.append(None)
                    continue
                x_BSK = np.concatenate(parts_dp, axis=0)
                cols.append(x_BSK.reshape(-1, x_BSK.shape[-1]))
            out[number] = (cols[0], cols[1], cols[2])
        return out
