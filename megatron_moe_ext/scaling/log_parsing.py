"""What a ``megatron-moe-ext train`` log says: training losses, validation losses, checkpoint loads.

Megatron's lines (printed by the last rank, prefixed ``[rankN] `` by our launcher), measured in a real log:
    iteration        6/       6 | consumed samples: ... | lm loss: 4.864306E+00 | ...
    validation loss at iteration 6 | lm loss value: 4.812272E+00 | ...                   (periodic evaluation)
    validation loss at iteration 6 on validation set | lm loss value: 4.822664E+00 | ... (after training)
    validation loss at iteration 6 on test set | lm loss value: 4.683903E+00 | ...       (test split: ignored)
A log may hold several attempts of one run (an interrupted one, then its resume): a later line for the same
iteration replaces an earlier one.
"""

from __future__ import annotations

import dataclasses
import re

_ITER = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|.*?\| lm loss: ([-+0-9.eEnaif]+)")
_VALID = re.compile(r"validation loss at iteration (\d+)( on validation set| on test set)? \| lm loss value: ([-+0-9.eEnaif]+)")
_LOADED = re.compile(r"successfully loaded checkpoint from .*? at iteration\s+(\d+)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainLog:
    """Parsed losses: ``train_loss[it]`` (lm loss of iteration it), ``validation`` [(iteration, loss, final)] in
    log order (final: the after-training "on validation set" evaluation), ``loaded_iterations`` (resumes),
    ``train_iters`` (the N of "iteration i/N", None without iteration lines)."""

    train_loss: dict[int, float]
    validation: list[tuple[int, float, bool]]
    loaded_iterations: list[int]
    train_iters: int | None


def parse_train_log(text: str) -> TrainLog:
    train: dict[int, float] = {}
    valid: list[tuple[int, float, bool]] = []
    loaded: list[int] = []
    total = None
    for line in text.splitlines():
        if m := _ITER.search(line):
            train[int(m.group(1))] = float(m.group(3))
            total = int(m.group(2))
        elif m := _VALID.search(line):
            if m.group(2) != " on test set":
                valid.append((int(m.group(1)), float(m.group(3)), m.group(2) == " on validation set"))
        elif m := _LOADED.search(line):
            loaded.append(int(m.group(1)))
    return TrainLog(train_loss=train, validation=valid, loaded_iterations=loaded, train_iters=total)


def finished(log: TrainLog, iterations: int) -> str | None:
    """None if the log shows iteration ``iterations`` of ``iterations`` and the final validation there, else why
    not (for the user)."""
    if log.train_iters != iterations or iterations not in log.train_loss:
        last = max(log.train_loss, default=0)
        return f"the log's last training iteration is {last} of {iterations}"
    if not any(final and it == iterations for it, _, final in log.validation):
        return f"the log has no final validation at iteration {iterations}"
    return None
