"""The launcher's preflight pieces that need no launcher (``training/preflight.py``, ``settings/peer.py``,
``training/data.py``): Megatron's split arithmetic, the PEER grid check, the index reader, the warm-up fit."""

from __future__ import annotations

import numpy
import pytest

from megatron_moe_ext.settings.peer import peer_layout
from megatron_moe_ext.training import data as data_lib
from megatron_moe_ext.training.preflight import split_document_counts
from megatron_moe_ext.training.train import DEFAULT_MODEL_ARGS, _fit_default_warmup


@pytest.mark.parametrize(
    "documents, split, counts",
    [
        (1, "98,1,1", [1, 0, 0]),
        (10, "98,1,1", [10, 0, 0]),
        (100, "98,1,1", [98, 1, 1]),
        (10, "100,0,0", [10, None, None]),
        (3, "1,1,1", [1, 1, 1]),
        (1000, "969, 30, 1", [969, 30, 1]),  # Megatron's legacy default
    ],
)
def test_split_document_counts_follow_megatron(documents: int, split: str, counts: list) -> None:
    assert split_document_counts(documents, split) == counts


def test_peer_topk_over_one_side_of_the_grid_is_refused() -> None:
    assert peer_layout(64, heads=1, topk=8, key_dim=8).grid == 8  # topk == n is fine
    with pytest.raises(ValueError, match=r"moe_peer_topk=9 exceeds the 8 sub-keys per side.*--moe-peer-num-experts 81 "
                                         r"\(9x9\) or more, or --moe-peer-topk 8 or less"):
        peer_layout(64, heads=1, topk=9, key_dim=8)


def test_sequence_lengths_read_from_the_index(tmp_path) -> None:
    docs = [numpy.arange(n, dtype=numpy.uint16) for n in (3, 5, 7)]
    prefix = data_lib.write_indexed_dataset(docs, tmp_path / "three")
    assert data_lib.sequence_lengths(prefix).tolist() == [3, 5, 7]


def _warmup(argv: list[str]) -> str:
    fitted = _fit_default_warmup(list(DEFAULT_MODEL_ARGS), argv)
    return fitted[len(fitted) - 1 - fitted[::-1].index("--lr-warmup-iters") + 1]


def test_default_warmup_fits_short_runs() -> None:
    assert _warmup([]) == "10"
    assert _warmup(["--train-iters", "100"]) == "10"
    assert _warmup(["--train-iters", "5"]) == "4"
    assert _warmup(["--train-iters=1"]) == "0"
    assert _warmup(["--train-iters", "100", "--lr-decay-iters", "3"]) == "2"
    assert _warmup(["--train-iters", "5", "--lr-warmup-iters", "10"]) == "10"  # the user's: checked, not changed
