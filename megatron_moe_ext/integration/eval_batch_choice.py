"""The expert-choice gap in the evaluation log of an unmodified pretrain script (``launch``).

At evaluation the expert-choice routers use their causal rule; the batch choice they train with sees later
tokens of the micro-batch. ``megatron-moe-ext train``'s forward step (``training/gpt_step.py``) reports both, as
``lm loss`` and ``lm loss (batch choice)``. Under ``launch pretrain_gpt.py`` the forward step is the script's own,
and ``pretrain`` offers no hook around it, so row ``script-eval-batch-choice`` wraps ``megatron.training.pretrain``
(which the script imports by name after the install) to wrap the step it is given: at an evaluation step of a model
with expert-choice routers on one pipeline stage, the step runs again on the same micro-batch (the batches the
first call drew from the data iterator, replayed) under ``batch_choice``, and the loss function's report gains the
second pass's ``lm loss`` under ``BATCH_CHOICE_LOSS_KEY``. Training steps, other models and pipeline-parallel runs
go to the script's step unchanged.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

BATCH_CHOICE_LOSS_KEY = "lm loss (batch choice)"
_NOTICES: set[str] = set()


def reports_batch_choice(model: Any) -> bool:
    """An evaluation step of ``model`` reports the batch-choice loss: eval mode, expert-choice routers, one
    pipeline stage (the second pass would need its own pipeline schedule; with several, a notice says so once).
    Shared by this row and ``megatron-moe-ext train``'s forward step (``training/gpt_step.py``)."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_moe_ext.layers.expert_choice_router import expert_choice_routers

    if model.training or not expert_choice_routers(model):
        return False
    if ps.get_pipeline_model_parallel_world_size() > 1:
        if "pp" not in _NOTICES and torch.distributed.get_rank() == 0:
            print("note: with pipeline parallelism the evaluation reports the causal-rule loss of the expert-choice "
                  f"routers only (no '{BATCH_CHOICE_LOSS_KEY}')", flush=True)
        _NOTICES.add("pp")
        return False
    return True


class _Recording:
    """The data iterator, keeping what the step drew so that the second pass sees the same micro-batch."""

    def __init__(self, inner: Iterator[Any]) -> None:
        self.inner, self.drawn = inner, []

    def __iter__(self) -> _Recording:
        return self

    def __next__(self) -> Any:
        item = next(self.inner)
        self.drawn.append(item)
        return item


def with_batch_choice_eval(forward_step: Callable[..., Any]) -> Callable[..., Any]:
    """``forward_step`` that, at evaluation of an expert-choice model, also reports the batch-choice loss."""

    if getattr(forward_step, "__module__", None) == "megatron_moe_ext.training.gpt_step":
        return forward_step  # our own step reports the gap itself (a script may import it, as the patched one does)

    @functools.wraps(forward_step)
    def step(data_iterator: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        if not reports_batch_choice(model):
            return forward_step(data_iterator, model, *args, **kwargs)
        import torch

        from megatron_moe_ext.layers.expert_choice_router import batch_choice

        recording = None if data_iterator is None else _Recording(data_iterator)
        output, loss_fn = forward_step(recording, model, *args, **kwargs)
        replay = None if recording is None else iter(recording.drawn)
        with torch.no_grad(), batch_choice(model):
            batch_output, batch_loss_fn = forward_step(replay, model, *args, **kwargs)

        def loss_with_gap(output_tensor: Any, *loss_args: Any, **loss_kwargs: Any) -> Any:
            result = loss_fn(output_tensor, *loss_args, **loss_kwargs)
            other = batch_loss_fn(batch_output)
            report, other_report = result[-1], other[-1]
            if isinstance(report, dict) and isinstance(other_report, dict) and "lm loss" in other_report:
                result = (*result[:-1], {**report, BATCH_CHOICE_LOSS_KEY: other_report["lm loss"]})
            return result

        return output, loss_with_gap

    return step


def wrap_pretrain(original):
    """Row ``script-eval-batch-choice``: ``pretrain`` with its forward step wrapped by ``with_batch_choice_eval``."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def pretrain(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.arguments["forward_step_func"] = with_batch_choice_eval(bound.arguments["forward_step_func"])
        return original(*bound.args, **bound.kwargs)

    return pretrain
