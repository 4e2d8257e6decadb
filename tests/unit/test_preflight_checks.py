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


def test_peer_topk_over_one_side_of_the_grid_is_exact_with_every_subkey_kept() -> None:
    """A top-k above the grid side n (here 8 of a 4x4 grid) keeps all n sub-keys per side: the candidates are the
    whole grid, so the search is exact (it used to fail at the first forward pass: the kernel demanded k sub-keys
    per side of the n there are)."""
    import torch

    from megatron_moe_ext.kernels.product_key_core import product_key_topk_reference
    from megatron_moe_ext.kernels.product_keys import product_key_topk

    layout = peer_layout(16, heads=1, topk=8, key_dim=8)
    assert (layout.grid, layout.subkey_topk) == (4, 4)
    torch.manual_seed(0)
    q_THD, keys = torch.randn(5, 1, 8, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)
    out = product_key_topk(q_THD, keys, 8, subkey_topk=layout.subkey_topk)
    ref = product_key_topk_reference(q_THD, keys, 8, subkey_topk=layout.subkey_topk)
    for got, want in zip(out, ref):  # scores and expert ids
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"moe_peer_subkey_topk=3 < min\(moe_peer_topk=8, n=4\).*fix: --moe-peer-subkey-topk 4"):
        peer_layout(16, heads=1, topk=8, key_dim=8, subkey_topk=3)


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
