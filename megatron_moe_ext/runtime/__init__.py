"""Runtimes that let megatron-core run where it otherwise would not (CPU with gloo)."""

from megatron_moe_ext.runtime.cpu import cpu_runtime_enabled, enable_cpu_runtime, init_gloo_from_env

__all__ = ["enable_cpu_runtime", "cpu_runtime_enabled", "init_gloo_from_env"]
