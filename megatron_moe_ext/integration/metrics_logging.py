"""Make our balance losses and metrics appear in Megatron's training log, TensorBoard and W&B.

Megatron's ``training_log`` (megatron/training/training.py, 0.19) reports the MoE metrics tracker
with a fixed ``track_names`` list (its aux losses and z-loss): any other recorded name is dropped.
There is no seam for extra names, so the integration table's row ``balance-logging`` wraps
``MoEMetricsTracker.report`` to append ours (``set_balance_names`` chooses them). They are appended unconditionally,
not only where recorded: Megatron reports with ``force_initialize=True``, which then creates the
entries on pipeline stages without MoE layers, so every stage all-reduces the same tensors (a name
recorded on one stage only would hang the pipeline all-reduce). The names therefore come from the
settings (``BalanceSettings.tracked_names``), identical on every rank.

Names ending in "loss" go to Megatron's loss dictionary (printed as ``name: 1.0E+00`` if >= 0), the
others to the MoE log string (``name: 0.42``); all of them to TensorBoard/W&B as scalars, per layer
with ``--moe-per-layer-logging``. Our values are non-negative by construction.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

_EXTRA_NAMES: list[str] = []


def wrap_report(original):
    """Row ``balance-logging``: ``MoEMetricsTracker.report`` with our names appended to ``track_names``."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def report(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        names = bound.arguments.get("track_names")
        if names is not None and _EXTRA_NAMES:
            names = [names] if isinstance(names, str) else list(names)
            bound.arguments["track_names"] = names + [n for n in _EXTRA_NAMES if n not in names]
        return original(*bound.args, **bound.kwargs)

    return report


def set_balance_names(names: Sequence[str]) -> None:
    """Report ``names`` with Megatron's own MoE metrics from now on (replaces earlier names). The
    ``balance-logging`` row must be installed (every rank setup does) for them to be printed."""
    _EXTRA_NAMES[:] = list(dict.fromkeys(names))


def installed_names() -> list[str]:
    """The names currently appended to Megatron's ``track_names``."""
    return list(_EXTRA_NAMES)
