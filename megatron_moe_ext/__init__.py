"""megatron-moe-ext: Mixture-of-Experts research features for NVIDIA Megatron-Core.

Importing this package changes nothing in Megatron; the CPU runtime is enabled only by an explicit
``megatron_moe_ext.runtime.enable_cpu_runtime()``.
"""

__version__ = "0.1.0"

from megatron_moe_ext.kernels.product_keys import product_key_topk  # noqa: E402

__all__ = ["__version__", "product_key_topk"]
