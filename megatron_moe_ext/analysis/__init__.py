"""Routing analysis: an on-disk trace format for routing decisions and pure statistics over it.

* :mod:`megatron_moe_ext.analysis.trace_format`: the columnar, streaming routing-trace format (schema in its
  docstring), :class:`TraceWriter` and :class:`TraceReader`.
* :mod:`megatron_moe_ext.analysis.statistics`: load, path diversity, layer-to-layer dependence, specialisation,
  product-key head overlap, PEER effective experts and linear CKA; pure functions plus streaming accumulators.
* :mod:`~megatron_moe_ext.analysis.summary`, :mod:`~megatron_moe_ext.analysis.plots`,
  :mod:`~megatron_moe_ext.analysis.report`: a trace's statistics in one streaming pass, figures, the report.
* Capture (needs Megatron; imported only by the commands): :mod:`~megatron_moe_ext.analysis.checkpoint_model`
  (a checkpoint's model at any TP/EP), :mod:`~megatron_moe_ext.analysis.routing_recorder` (hooks, gathering on
  rank 0), :mod:`~megatron_moe_ext.analysis.token_windows` (data), :mod:`~megatron_moe_ext.analysis.capture`
  (one rank) and :mod:`~megatron_moe_ext.analysis.cli` (``analyze`` / ``compare``).

* Instruments that ride along with capture (:mod:`~megatron_moe_ext.analysis.instrument_api` is their contract):
  interventions (:mod:`~megatron_moe_ext.analysis.interventions`), readouts
  (:mod:`~megatron_moe_ext.analysis.logit_lens`, :mod:`~megatron_moe_ext.analysis.probes`,
  :mod:`~megatron_moe_ext.analysis.coactivation` from the trace) and
  :mod:`~megatron_moe_ext.analysis.moefication`; training dynamics (:mod:`~megatron_moe_ext.analysis.dynamics`,
  ``megatron-moe-ext dynamics``) and the five-question report (:mod:`~megatron_moe_ext.analysis.questions_report`).

Importing this package does not import Megatron.
"""

from megatron_moe_ext.analysis.statistics import (
    ExpertLoadAccumulator,
    HeadOverlapAccumulator,
    JointCountAccumulator,
    LinearCKAAccumulator,
    LoadStats,
    MutualInformation,
    PathDiversity,
    PathDiversityAccumulator,
    bucket_positions,
    cka_matrix,
    dead_experts,
    effective_experts,
    expert_counts,
    expert_label_counts,
    head_overlap,
    linear_cka,
    load_entropy,
    load_stats,
    max_violation,
    mutual_information,
    path_diversity,
    path_diversity_curve,
    path_keys,
    plugin_mi_bias,
    routing_dependence,
    routing_pairs,
    specialisation,
    top1,
)
from megatron_moe_ext.analysis.trace_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LayerChunk,
    LayerSpec,
    TraceChunk,
    TraceReader,
    TraceWriter,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ExpertLoadAccumulator",
    "HeadOverlapAccumulator",
    "JointCountAccumulator",
    "LayerChunk",
    "LayerSpec",
    "LinearCKAAccumulator",
    "LoadStats",
    "MutualInformation",
    "PathDiversity",
    "PathDiversityAccumulator",
    "TraceChunk",
    "TraceReader",
    "TraceWriter",
    "bucket_positions",
    "cka_matrix",
    "dead_experts",
    "effective_experts",
    "expert_counts",
    "expert_label_counts",
    "head_overlap",
    "linear_cka",
    "load_entropy",
    "load_stats",
    "max_violation",
    "mutual_information",
    "path_diversity",
    "path_diversity_curve",
    "path_keys",
    "plugin_mi_bias",
    "routing_dependence",
    "routing_pairs",
    "specialisation",
    "top1",
]
