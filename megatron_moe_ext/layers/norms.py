"""LayerNorm/RMSNorm that work with sequence parallelism without Transformer Engine or apex.

Megatron-Core's only norm without TE/apex, ``WrappedTorchNorm``, asserts ``not sequence_parallel``
(``megatron/core/transformer/torch_norm.py:50``). Under SP each TP rank normalises its own slice of
the sequence, so the norm itself needs nothing new: only its parameters must carry
``sequence_parallel=True`` so that ``finalize_model_grads`` all-reduces their (partial) gradients
over the TP group. This builder returns plain ``torch.nn.LayerNorm``/``RMSNorm`` modules, so state
dict keys and numerics are those of ``WrappedTorchNorm``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig

_NORMS: dict[str, type[torch.nn.Module]] = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class SequenceParallelTorchNorm:
    """Spec-compatible norm builder: ``SequenceParallelTorchNorm(config=, hidden_size=, eps=)``."""

    def __new__(  # type: ignore[misc]
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        norm_cls = _NORMS.get(config.normalization)
        if norm_cls is None:
            raise ValueError(
                f"normalization={config.normalization!r} is not supported without Transformer Engine; "
                f"choose from {sorted(_NORMS)}."
            )
        if config.layernorm_zero_centered_gamma:
            raise ValueError(
                "layernorm_zero_centered_gamma=True needs Transformer Engine or apex; "
                "fix: drop --apply-layernorm-1p on CPU."
            )
        norm = norm_cls(hidden_size, eps=eps)
        for param in norm.parameters():
            # Read by finalize_model_grads to all-reduce SP-partial grads over the TP group.
            param.sequence_parallel = config.sequence_parallel
        return norm
