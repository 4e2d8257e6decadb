"""Megatron's alltoall dispatcher with routing maps whose rows hold any number of experts.

The routers of ``--moe-router-type expert_choice`` / ``relu`` and of ``--moe-null-experts`` give a token zero,
one or many real experts. Megatron's ``MoEAlltoAllTokenDispatcher.preprocess`` (0.19) sizes the dropless
permutation as ``tokens x moe_router_topk`` (static, to avoid a device sync), and its permute keeps exactly that
many entries: with variable rows that count is wrong (a split-size mismatch across EP ranks, silently wrong
rows on one). Its own token-dropping branch already counts the routing map instead; row
``variable-experts-alltoall`` of the integration table does the same for our variable routers, and nothing for
any other configuration. The allgather dispatcher counts the map already and needs nothing.
"""

from __future__ import annotations

import functools


def wrap_alltoall_preprocess(original):
    """Row ``variable-experts-alltoall``: after Megatron's preprocess, the dropless output size from the map."""

    @functools.wraps(original)
    def preprocess(self, routing_map):
        out = original(self, routing_map)
        from megatron_moe_ext.settings import ext_settings

        if not self.drop_and_pad and ext_settings(self.config).router.variable_experts:
            self.num_out_tokens = routing_map.sum()  # as Megatron's capacity branch: a dynamic size
            self._maybe_update_cuda_sync_point("before_permutation_1")
        return out

    return preprocess
