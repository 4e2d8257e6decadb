"""megatron-moe-ext: Mixture-of-Experts research features for NVIDIA Megatron-Core.

Importing this package changes nothing in Megatron; the CPU runtime is enabled only by an explicit
``megatron_moe_ext.runtime.enable_cpu_runtime()``.
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:  # PEP 562: a lazy attribute
    # Lazy so that importing the package does not import torch: processes that only re-import a rank's main
    # module (multiprocessing's spawn, e.g. torch_dist checkpointing's Manager) then start in a fraction of a second.
    if name == "product_key_topk":
        from megatron_moe_ext.kernels.product_keys import product_key_topk

        return product_key_topk
    raise AttributeError(f"module 'megatron_moe_ext' has no attribute {name!r}")


__all__ = ["__version__", "product_key_topk"]
