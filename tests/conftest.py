"""Test tiers: unit (one process), distributed (``world_size(n)``: n gloo ranks), gpu (``gpu``)."""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "world_size(n): runs its body on n gloo ranks via the `distributed` fixture")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped only where none is present")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (gpu tier)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture
def distributed(request: pytest.FixtureRequest):
    """``distributed(fn, *args, world_size=None, **kwargs)`` runs ``fn`` on the marker's n gloo ranks."""
    from megatron_moe_ext.testing import run_distributed

    marker = request.node.get_closest_marker("world_size")
    default = marker.args[0] if marker is not None else 1

    def run(fn, *args, world_size: int | None = None, timeout_s: float = 300.0, **kwargs):
        return run_distributed(fn, world_size or default, *args, timeout_s=timeout_s, **kwargs)

    return run


@pytest.fixture
def tiny_config():
    """Factory for the tiny 2-layer MoE GPT config (``megatron_moe_ext.testing.tiny.tiny_config``)."""
    from megatron_moe_ext.testing.tiny import tiny_config as factory

    return factory
