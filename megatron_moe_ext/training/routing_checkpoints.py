"""Routing-analysis checkpoints: ``megatron-moe-ext train --routing-checkpoints 0,10,50`` saves the model (only:
no optimizer, no RNG state) at those iterations, in Megatron's torch_dist format, to ``<--save>/routing/``, so
``megatron-moe-ext dynamics`` (and ``analyze --checkpoint <save>/routing --iteration N``) can load each one at
any TP/EP. The final checkpoint is the run's own ``--save`` one (Megatron always saves at the end of training).

How, inside Megatron's loop: the forward step is wrapped. The first training forward step that Megatron runs
with ``args.curr_iteration == N`` (N iterations done, the weights those N updates produced) calls Megatron's own
``save_checkpoint(N, [model], None, None, 0)`` with ``args.save`` pointed at ``<save>/routing`` and
``no_save_optim``/``no_save_rng`` set for that call (then restored), before the step's forward pass. Every rank
runs the same iterations, so the save's collectives match. Evaluation steps (``model.training`` False) never
save. A resumed run saves only the listed iterations it still runs.

The launcher starts the ranks with :func:`rank_main` (``python -m megatron_moe_ext.training.routing_checkpoints
--routing-iterations 0,10,50 MEGATRON_FLAGS...`` under torchrun; the same argv forked on CPU).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

ITERATIONS_FLAG = "--routing-iterations"  # first two items of the rank argv: the flag and "0,10,50"
ROUTING_SUBDIR = "routing"


def parse_iterations(text: str) -> tuple[int, ...]:
    """``"10,50,100"`` -> (10, 50, 100), sorted and unique; ValueError naming the bad item and the fix."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--routing-checkpoints {text!r} names no iteration; fix: comma-separated iterations, "
                         f"e.g. --routing-checkpoints 10,50,100")
    out = set()
    for t in items:
        if not t.isdigit():
            raise ValueError(f"--routing-checkpoints {text!r}: {t!r} is not an iteration (an integer >= 0); fix: "
                             f"comma-separated iterations, e.g. --routing-checkpoints 10,50,100")
        out.add(int(t))
    return tuple(sorted(out))


def check_routing_checkpoints(iterations: Sequence[int], *, train_iters: int | None, save: str | None,
                              ckpt_format: str, virtual_pipeline: int | None, pipeline: int = 1) -> None:
    """ValueError unless the routing checkpoints can be saved by this run (checked in the launcher)."""
    if pipeline > 1:
        # The save runs inside the forward step; under pipeline parallelism a later stage is then blocked in
        # its receive while the first stage waits in the checkpoint's collectives.
        raise ValueError(f"--routing-checkpoints with --pipeline-model-parallel-size {pipeline}: the model is saved "
                         f"from the forward step, where pipeline stages wait on each other's activations; fix: "
                         f"train the run whose routing you follow without pipeline parallelism")
    if save is None:
        raise ValueError("--routing-checkpoints needs --save DIR (they go to DIR/routing, next to the final "
                         "checkpoint they are compared with); fix: add --save DIR")
    if ckpt_format != "torch_dist":
        raise ValueError(f"--routing-checkpoints with --ckpt-format {ckpt_format}: analysis loads torch_dist "
                         f"checkpoints; fix: --ckpt-format torch_dist")
    if virtual_pipeline:
        raise ValueError("--routing-checkpoints with a virtual pipeline (--num-layers-per-virtual-pipeline-stage): "
                         "the forward step sees one model chunk; fix: drop the virtual pipeline for this run")
    if train_iters is not None:
        late = [i for i in iterations if i >= train_iters]
        if late:
            raise ValueError(f"--routing-checkpoints {','.join(map(str, late))} >= --train-iters {train_iters}: "
                             f"the last forward step runs at iteration {train_iters - 1}, and the final "
                             f"checkpoint (iteration {train_iters}) is the run's own --save; fix: iterations below "
                             f"{train_iters}")


def routing_dir(save: str) -> str:
    return os.path.join(save, ROUTING_SUBDIR)


def save_routing_checkpoint(iteration: int, model: Any) -> None:
    """Megatron's ``save_checkpoint`` of the model alone into ``<args.save>/routing`` (args restored after)."""
    from megatron.training import get_args
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.training import preprocess_common_state_dict

    args = get_args()
    names = ("save", "no_save_optim", "no_save_rng", "async_save")
    before = {n: getattr(args, n) for n in names}
    args.save, args.no_save_optim, args.no_save_rng, args.async_save = routing_dir(before["save"]), True, True, False
    try:
        # Megatron's own preprocessing of the common state (as its periodic saves): rank-specific args dropped
        # from the cross-rank consistency check.
        save_checkpoint(iteration, [model], None, None, 0,
                        preprocess_common_state_dict_fn=preprocess_common_state_dict)
    finally:
        for n, v in before.items():
            setattr(args, n, v)


def with_routing_checkpoints(forward_step: Callable[..., Any], iterations: Sequence[int]) -> Callable[..., Any]:
    """``forward_step`` that first saves a routing checkpoint at each iteration of ``iterations`` (the first
    training micro-batch of that iteration); ``forward_step`` itself when ``iterations`` is empty."""
    if not iterations:
        return forward_step
    pending = set(iterations)

    def step(data_iterator: Any, model: Any, *rest: Any, **kw: Any) -> Any:
        from megatron.training import get_args

        iteration = get_args().curr_iteration
        if model.training and iteration in pending:
            pending.discard(iteration)
            save_routing_checkpoint(iteration, model)
        return forward_step(data_iterator, model, *rest, **kw)

    return step


def rank_main(argv: Sequence[str]) -> None:
    """One train rank with routing checkpoints: ``argv`` = ``--routing-iterations 0,10,50`` then the Megatron
    flags; ``rank_entry.rank_main`` with the forward step wrapped."""
    if len(argv) < 2 or argv[0] != ITERATIONS_FLAG:
        raise SystemExit(f"usage: python -m megatron_moe_ext.training.routing_checkpoints {ITERATIONS_FLAG} "
                         f"0,10,50 MEGATRON_FLAGS...")
    iterations = parse_iterations(argv[1])
    from megatron_moe_ext.training.rank_entry import rank_main as train_rank_main

    train_rank_main(list(argv[2:]), wrap_step=lambda step: with_routing_checkpoints(step, iterations))


if __name__ == "__main__":
    rank_main(sys.argv[1:])
