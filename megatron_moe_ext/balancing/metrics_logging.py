"""Make our balance losses and metrics appear in Megatron's training log, TensorBoard and W&B.

Megatron's ``training_log`` (megatron/training/training.py, 0.19) reports the MoE metrics tracker
with a fixed ``track_names`` list (its aux losses and z-loss): any other recorded name is dropped.
There is no seam for extra names, so ``install_balance_logging`` wraps
``MoEMetricsTracker.report`` (once, idempotent) to append ours. They are appended unconditionally,
not only where recorded: Megatron reports with ``force_initialize=True``, which then creates the
entries on pipeline stages without MoE layers, so every stage all-reduces the same tensors (a name
recorded on one stage only would hang the pipeline all-reduce). The names therefore come from the
settings (``settings.tracked_names_for``), identical on every rank.

Names ending in "loss" go to Megatron's loss dictionary (printed as ``name: 1.0E+00`` if >= 0), the
others to the MoE log string (``name: 0.42``); all of them to TensorBoard/W&B as scalars, per layer
with ``--moe-per-layer-logging``. Our values are non-negative by construction.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker

_EXTRA_NAMES: list[str] = []
_ORIGINAL_REPORT = MoEMetricsTracker.report
_SIGNATURE = inspect.signature(_ORIGINAL_REPORT)


@functools.wraps(_ORIGINAL_REPORT)
def _report_with_balance_names(self, *args, **kwargs):
    bound = _SIGNATURE.bind(self, *args, **kwargs)
    names = bound.arguments.get("track_names")
    if names is not None and _EXTRA_NAMES:
        names = [names] if isinstance(names, str) else list(names)
        bound.arguments["track_names"] = names + [n for n in _EXTRA_NAMES if n not in names]
    return _ORIGINAL_REPORT(*bound.args, **bound.kwargs)


def install_balance_logging(names: Sequence[str]) -> None:
    """Report ``names`` with Megatron's own MoE metrics from now on (replaces earlier names)."""
    _EXTRA_NAMES[:] = list(dict.fromkeys(names))
    if MoEMetricsTracker.report is not _report_with_balance_names:
        MoEMetricsTracker.report = _report_with_balance_names


def installed_names() -> list[str]:
    """The names currently appended to Megatron's ``track_names``."""
    return list(_EXTRA_NAMES)
