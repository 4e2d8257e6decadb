"""Test utilities shared by this package's tests and by plugin authors: a gloo multi-rank runner and
tiny Megatron models."""

from megatron_moe_ext.testing.distributed import DistributedTestError, free_port, run_distributed

__all__ = ["DistributedTestError", "free_port", "run_distributed"]
