"""Test tiers: unit (one process), distributed (``world_size(n)``: n gloo ranks), gpu (``gpu``)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

_SHARED_CACHE: list[str] = []


def shared_cache() -> str:
    """One megatron-moe-ext cache (built datasets, Megatron's index files, the compiled CPU kernel) for every
    end-to-end run of the session. Entries are content-addressed and written atomically, so sharing changes no
    result, only the time spent rebuilding them (several seconds per run on 2 cores)."""
    if not _SHARED_CACHE:
        _SHARED_CACHE.append(tempfile.mkdtemp(prefix="megatron-moe-ext-test-cache-"))
    return _SHARED_CACHE[0]


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    for path in _SHARED_CACHE:
        shutil.rmtree(path, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # One core per worker: torch's default (all cores) in each of two workers would oversubscribe, and
        # the ranks that tests start get OMP_NUM_THREADS=1 the same way.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
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
