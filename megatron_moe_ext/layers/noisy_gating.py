"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks", eq. 3-5).

H(x)_i = (x . W_g)_i + StandardNormal() * softplus((x . W_noise)_i) at train time; the top-k and
the gates are taken on H(x). W_noise starts at zero (noise std softplus(0) = 0.69) and learns
through the gates. Megatron has input jitter but not this, so it comes as a thin TopKRouter
subclass here and as an option of the product-key router (noise on each half's sub-key scores,
which keeps the search exact for the noisy scores).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig


def add_gating_noise(logits: torch.Tensor, noise_logits: torch.Tensor) -> torch.Tensor:
    """logits + N(0, 1) * softplus(noise_logits) (same shape); differentiable in both."""
    std = torch.nn.functional.softplus(noise_logits.to(logits.dtype))
    return logits + torch.randn_like(logits) * std


class NoisyTopKRouter(TopKRouter):
    """Megatron's TopKRouter with noisy top-k gating at train time (eval routes on clean logits).

    Adds ``noise_weight`` [num_experts, hidden], zero-initialised; everything else (score function,
    aux losses, z-loss, capacity, expert bias) is TopKRouter's, applied to the noisy logits.
    """

    def __init__(
        self, config: TransformerConfig, pg_collection: ProcessGroupCollection | None = None, is_mtp_layer: bool = False,
        **router_kwargs,  # what newer Megatron adds (dev: layer_number=) goes on to TopKRouter
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, **router_kwargs)
        self.noise_weight = torch.nn.Parameter(
            torch.zeros(config.num_moe_experts, config.hidden_size, dtype=config.params_dtype)
        )
        # Replicated over TP but fed SP-sharded tokens: partial gradients, all-reduced over TP.
        self.noise_weight.sequence_parallel = config.sequence_parallel

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        logits = super().gating(input)
        if not self.training:
            return logits
        noise_logits = torch.nn.functional.linear(input.to(logits.dtype), self.noise_weight.to(logits.dtype))
        return add_gating_noise(logits, noise_logits)
