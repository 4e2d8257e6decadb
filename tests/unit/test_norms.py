"""SequenceParallelTorchNorm: plain torch norms whose params are marked for SP grad reduction."""

from __future__ import annotations

import pytest
import torch

from megatron_moe_ext.layers.norms import SequenceParallelTorchNorm
from megatron_moe_ext.testing.tiny import tiny_config


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_norm_matches_torch_and_marks_params(normalization: str, sequence_parallel: bool) -> None:
    config = tiny_config(normalization=normalization, num_moe_experts=None)
    config.sequence_parallel = sequence_parallel  # TP=1 validation would reject SP at construction
    norm = SequenceParallelTorchNorm(config=config, hidden_size=32, eps=1e-5)
    reference = (torch.nn.LayerNorm if normalization == "LayerNorm" else torch.nn.RMSNorm)(32, eps=1e-5)
    x = torch.randn(5, 2, 32)
    torch.testing.assert_close(norm(x), reference(x))
    assert all(p.sequence_parallel is sequence_parallel for p in norm.parameters())


def test_unsupported_normalization_is_a_value_error() -> None:
    config = tiny_config(num_moe_experts=None)
    config.normalization = "L2Norm"
    with pytest.raises(ValueError, match="normalization='L2Norm'"):
        SequenceParallelTorchNorm(config=config, hidden_size=32)
