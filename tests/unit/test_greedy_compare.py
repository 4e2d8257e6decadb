"""Greedy-token comparison of exports: exact up to the first near-tie of the reference (known answers)."""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext.testing.random_checkpoint import assert_greedy_equal

PROMPT = [[1, 2], [3, 4]]


def _greedy(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([p + r for p, r in zip(PROMPT, rows)])


def test_equal_tokens_compare_every_step() -> None:
    ref = _greedy([[5, 6, 7], [8, 9, 10]])
    margins = torch.ones(2, 3)
    assert assert_greedy_equal(ref.clone(), ref, margins, tolerance=1e-4) == 6


def test_a_difference_at_or_after_a_near_tie_is_allowed() -> None:
    ref = _greedy([[5, 6, 7], [8, 9, 10]])
    out = _greedy([[5, 0, 0], [8, 9, 10]])  # row 0 breaks the step-1 tie the other way
    margins = torch.tensor([[1.0, 1e-4, 1.0], [1.0, 1.0, 1.0]])
    assert assert_greedy_equal(out, ref, margins, tolerance=1e-4) == 1 + 3


def test_a_difference_before_any_near_tie_fails() -> None:
    ref = _greedy([[5, 6, 7], [8, 9, 10]])
    out = _greedy([[5, 0, 7], [8, 9, 10]])
    margins = torch.tensor([[1.0, 1.0, 1e-5], [1.0, 1.0, 1.0]])
    with pytest.raises(AssertionError, match="row 0: greedy token 1 differs before any near-tie"):
        assert_greedy_equal(out, ref, margins, tolerance=1e-4)


def test_a_changed_prompt_fails() -> None:
    ref = _greedy([[5, 6, 7], [8, 9, 10]])
    out = ref.clone()
    out[1, 0] = 0
    with pytest.raises(AssertionError):
        assert_greedy_equal(out, ref, torch.ones(2, 3), tolerance=1e-4)
