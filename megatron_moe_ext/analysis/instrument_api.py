"""The contract between trace capture and the rank-side instruments of ``analyze`` (interventions, readouts,
MoEfication): what capture hands an instrument, what it gets back, and where the result goes.

Capture (:mod:`megatron_moe_ext.analysis.capture`) loads a checkpoint's model at any TP/EP and runs it over the
token windows, batch by batch, on every rank. An :class:`Instrument` rides along:

1. ``attach(model, env)`` once, after the model is loaded: register forward hooks (never recompute routing by
   hand; modify what a router returns through a hook on the router module).
2. per batch, after the clean forward pass: ``on_batch(batch, clean_loss_BS, rerun)``. ``clean_loss_BS`` is the
   per-token next-token loss of this rank's micro-batch [B, S] (float32; ``batch.loss_mask_BS`` marks the tokens
   that have a next token). ``rerun()`` runs the model again on the same batch and returns the per-token loss:
   an intervention arms its hooks, calls ``rerun()``, disarms them. EVERY rank must call ``rerun`` the same number
   of times per batch (TP/EP collectives), so that number may depend only on the plan, never on local data.
   Optional: an instrument that defines ``calibrate(batch, clean_loss_BS)`` gets a clean pass of its own over
   every batch before the traced pass (e.g. the global load of each expert, the most frequent routing paths),
   unless its ``needs_calibration`` attribute is False (decided in ``attach``; the same on every rank);
   ``detach()``, when defined, is called once at the end to remove hooks.
3. ``result()`` once at the end, on every rank (collectives allowed: gather over ``env.data_parallel_group``
   etc.); rank 0 returns a JSON-able dict, the other ranks return None.

Capture writes ``{name: result}`` of all instruments as ``instruments.json`` (atomically) in the trace
directory; the report reads it back, and each instrument's :func:`report_section` renders its section of
``report.md``; its ``summary.json`` key is the instrument's name. Instruments are found by name in
``INSTRUMENTS`` (name -> "module:factory"; ``factory(name, env) -> Instrument``: the interventions share one
factory), so capture imports only those asked for; ``TRACE_READOUTS`` are computed from the
trace alone by the report.

Parity rule: results must not depend on the parallel layout: reduce counts and sums over the data-parallel
group in a fixed order; random choices are seeded by (seed, window index, position), never by rank.

Legend: B micro-batch (windows on this rank), S sequence length, T = B*S tokens.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class RankEnv:
    """Where an instrument runs: layout, groups and the model's facts."""

    rank: int
    world_size: int
    data_parallel_rank: int
    data_parallel_size: int
    data_parallel_group: Any  # torch.distributed ProcessGroup
    tensor_parallel_size: int
    expert_parallel_size: int
    sequence_parallel: bool
    seq_length: int
    micro_batch_size: int
    label_names: tuple[str, ...]
    seed: int
    options: dict[str, Any]  # instrument options from the command line (name -> value), e.g. {"ablate_top_m": 2}
    tensor_parallel_rank: int = 0
    tensor_parallel_group: Any = None  # torch.distributed ProcessGroup (None: TP 1)
    model_args: Any = None  # the Megatron namespace the model was built from (analysis layout)


def router_rows(batch: Batch, env: RankEnv, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(window_T, position_T) of the ``rows`` token rows a router (or PEER layer) sees on this rank: Megatron's
    s-major order [S_loc, B] over this rank's windows, S_loc = S / TP under sequence parallelism (this TP rank's
    consecutive slice), S otherwise. Seeds and per-token statistics use these, never the rank."""
    B = len(batch.window_ids_B)
    if rows % B:
        raise ValueError(f"{rows} router rows are not a multiple of the micro-batch {B}")
    S_loc = rows // B
    first = env.tensor_parallel_rank * S_loc if env.sequence_parallel and S_loc != env.seq_length else 0
    position_T = np.repeat(np.arange(first, first + S_loc, dtype=np.int64), B)
    window_T = np.tile(np.asarray(batch.window_ids_B, dtype=np.int64), S_loc)
    return window_T, position_T


@dataclasses.dataclass(frozen=True)
class Batch:
    """One micro-batch on this rank: ``window_ids_B`` index the analysed windows (global, layout-independent);
    ``real_B`` is False for the padding copies of a short last batch (exclude them from every statistic)."""

    window_ids_B: np.ndarray
    real_B: np.ndarray
    tokens_BS: Any  # torch.LongTensor [B, S] on the model's device
    labels_BS: np.ndarray  # int64 user label (domain) of each token
    loss_mask_BS: np.ndarray  # bool: token has a next token in its window (the loss is defined)


class Instrument(Protocol):
    name: str

    def attach(self, model: Any, env: RankEnv) -> None: ...

    def on_batch(self, batch: Batch, clean_loss_BS: Any, rerun: Callable[[], Any]) -> None: ...

    def result(self) -> dict[str, Any] | None: ...


# The public names of ``analyze --interventions`` and ``analyze --readouts`` (``all`` = every one that applies).
INTERVENTIONS: tuple[str, ...] = ("expert_ablation", "topk_change", "random_routing", "frozen_paths", "layer_copy")
READOUTS: tuple[str, ...] = ("logit_lens", "probes", "coactivation", "moefication")

# Rank-side instruments: name -> "module:factory"; ``factory(name, env) -> Instrument``. Each module also defines
# ``report_section(result: dict, figures_dir: str) -> str``: the Markdown of its section (it may save figures
# into figures_dir and link them as ``figures/NAME.png``).
INSTRUMENTS: dict[str, str] = {
    **{name: "megatron_moe_ext.analysis.interventions:make_intervention" for name in INTERVENTIONS},
    "logit_lens": "megatron_moe_ext.analysis.logit_lens:LogitLens",
    "probes": "megatron_moe_ext.analysis.probes:Probes",
    "moefication": "megatron_moe_ext.analysis.moefication:MoEfication",
}
# Readouts computed from a routing trace alone (work with ``analyze --trace`` too): name -> "module:function";
# ``function(reader: TraceReader) -> dict``; the module defines ``report_section`` as above.
TRACE_READOUTS: dict[str, str] = {
    "coactivation": "megatron_moe_ext.analysis.coactivation:coactivation_readout",
}


def load_entry(name: str, table: dict[str, str] | None = None) -> Any:
    """The object registered under ``name`` in ``table`` (default INSTRUMENTS; ValueError naming the known ones).
    The module of an entry: ``load_entry(name).__module__``, or import ``table[name]``'s module part."""
    table = INSTRUMENTS if table is None else table
    if name not in table:
        raise ValueError(f"unknown name {name!r}; fix: one of {', '.join(sorted(table))}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)
