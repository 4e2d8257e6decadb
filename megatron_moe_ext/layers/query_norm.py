"""Normalisation of product-key queries: batchnorm, layernorm, rmsnorm or none.

PKM and PEER put a BatchNorm on the queries: it keeps every sub-key reachable (PEER's ablation:
expert usage 99.8% -> 100%, KL-to-uniform of usage 1.52 -> 1.06). Over a causal LM batch that is a
**leak**: the statistics of one micro-batch mix all positions and sequences, so a token's routing
at train time depends on later tokens and on other sequences, and eval (running statistics)
differs from training. LayerNorm/RMSNorm normalise each token's query on its own and have neither
problem.

Our BatchNorm computes exact statistics of the whole micro-batch, whatever the parallelism:
padding tokens are left out, and the sums are all-reduced over ``stats_group`` (for a Megatron
layer the tensor+data+context group, i.e. synchronised BatchNorm over the sequence-parallel shards
and the data-parallel replicas), with an all-reduce in backward too, so gradients are those of the
single-rank computation. One all-reduce of 2*H*D+1 floats per layer and direction.

Legend: T tokens, H heads, D key dimension.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

QUERY_NORMS = ("batchnorm", "layernorm", "rmsnorm", "none")


class _AllReduceSum(torch.autograd.Function):
    """Sum over ``group`` in forward and in backward: every rank's statistics feed every rank's
    loss, so each rank's share of the gradient is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over ``group`` (identity when there is no group or it has one rank)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tensor
    return _AllReduceSum.apply(tensor, group)


def masked_batch_moments(
    x_TF: torch.Tensor, valid_T: torch.Tensor | None, group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and biased variance per feature over the valid rows of all ranks of ``group``,
    and the number of rows counted. Differentiable, fp32."""
    x_TF = x_TF.float()
    w_T1 = (torch.ones_like(x_TF[:, :1]) if valid_T is None else valid_T.reshape(-1, 1).to(x_TF.dtype))
    # One all-reduce of [count | sum | sum of squares]; shifted sums would be more stable but need
    # a second round trip, and queries are normalised O(1) values.
    packed = torch.cat([w_T1.sum(0), (x_TF * w_T1).sum(0), (x_TF * x_TF * w_T1).sum(0)])
    packed = all_reduce_sum(packed, group)
    features = x_TF.shape[1]
    count = packed[0].clamp(min=1.0)
    mean_F = packed[1 : 1 + features] / count
    var_F = (packed[1 + features :] / count - mean_F * mean_F).clamp(min=0.0)
    return mean_F, var_F, packed[0]


class QueryNorm(torch.nn.Module):
    """Normalises queries [T, H, D]: per token over D (layernorm, rmsnorm) or per feature (H*D)
    over the micro-batch (batchnorm, with running statistics for eval). Affine parameters [H, D]."""

    def __init__(
        self,
        kind: str,
        num_heads: int,
        key_dim: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        stats_group=None,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if kind not in QUERY_NORMS:
            raise ValueError(f"query norm {kind!r} is unknown; choose from {', '.join(QUERY_NORMS)}")
        self.kind = kind
        self.eps = eps
        self.momentum = momentum
        self.stats_group = stats_group
        if kind == "none":
            return
        self.weight = torch.nn.Parameter(torch.ones(num_heads, key_dim))
        # Under sequence parallelism each TP rank sees a slice of the tokens: the gradient of these
        # replicated parameters is partial and finalize_model_grads all-reduces it over TP.
        self.weight.sequence_parallel = sequence_parallel
        if kind in ("batchnorm", "layernorm"):
            self.bias = torch.nn.Parameter(torch.zeros(num_heads, key_dim))
            self.bias.sequence_parallel = sequence_parallel
        else:
            self.bias = None
        if kind == "batchnorm":
            self.register_buffer("running_mean", torch.zeros(num_heads, key_dim))
            self.register_buffer("running_var", torch.ones(num_heads, key_dim))

    def forward(self, q_THD: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
        """``valid_T``: True for real tokens (used by batchnorm's statistics only)."""
        if self.kind == "none":
            return q_THD
        T, H, D = q_THD.shape
        if self.kind == "layernorm":
            y = torch.nn.functional.layer_norm(q_THD.float(), (D,), eps=self.eps)
        elif self.kind == "rmsnorm":
            y = torch.nn.functional.rms_norm(q_THD.float(), (D,), eps=self.eps)
        elif self.training:
            mean_F, var_F, count = masked_batch_moments(q_THD.reshape(T, H * D), valid_T, self.stats_group)
            y = (q_THD.float() - mean_F.view(H, D)) * torch.rsqrt(var_F.view(H, D) + self.eps)
            with torch.no_grad():
                # Unbiased variance for the running estimate, as torch's BatchNorm does.
                unbiased = var_F * (count / (count - 1).clamp(min=1.0))
                self.running_mean.lerp_(mean_F.view(H, D).to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(unbiased.view(H, D).to(self.running_var.dtype), self.momentum)
        else:
            y = (q_THD.float() - self.running_mean.float()) * torch.rsqrt(self.running_var.float() + self.eps)
        y = y * self.weight.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y
