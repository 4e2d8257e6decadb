"""What every PEER expert backend shares: input checks and where table gradients go.

Kept apart from ``peer_experts`` (the dispatcher, which imports every backend) so that the backends
(``peer_cpu``, ``peer_triton``) import these without importing the dispatcher: imports go one way.

Legend: T tokens, h hidden, N experts, P (token, expert) pairs.
"""

from __future__ import annotations

import torch

from megatron_moe_ext.kernels.peer_reference import ACTIVATIONS

Tensor = torch.Tensor


def check_inputs(x_Th: Tensor, u_Nh: Tensor, v_Nh: Tensor, ids_P: Tensor, gates_P: Tensor, offsets_T1: Tensor, activation: str) -> None:
    """Shapes and dtypes every backend relies on (ValueError naming the values)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is unknown; choose from {', '.join(ACTIVATIONS)}")
    if x_Th.dim() != 2 or u_Nh.dim() != 2 or u_Nh.shape != v_Nh.shape or u_Nh.shape[1] != x_Th.shape[1]:
        raise ValueError(f"x {tuple(x_Th.shape)}, u {tuple(u_Nh.shape)}, v {tuple(v_Nh.shape)}: expected x [T, h] and "
                         "u, v [N, h] with the same h")
    if ids_P.dim() != 1 or gates_P.shape != ids_P.shape:
        raise ValueError(f"ids {tuple(ids_P.shape)} and gates {tuple(gates_P.shape)} must both be [P]")
    if offsets_T1.shape != (x_Th.shape[0] + 1,):
        raise ValueError(f"offsets {tuple(offsets_T1.shape)} must be [T+1] = [{x_Th.shape[0] + 1}]")


def _table_grad_target(table: Tensor) -> tuple[Tensor, bool]:
    """Where a table's row gradients go: its main_grad under Megatron DDP (fused accumulation), else
    a new zero tensor returned to autograd."""
    main_grad = getattr(table, "main_grad", None)
    if main_grad is not None and hasattr(table, "grad_added_to_main_grad"):
        return main_grad, True
    return torch.zeros_like(table), False


def _table_grad_result(table: Tensor, buf: Tensor, fused: bool) -> Tensor:
    if not fused:
        return buf
    table.grad_added_to_main_grad = True
    # DDP's hook skips this placeholder (grad_added_to_main_grad); empty() touches no memory.
    return torch.empty(table.shape, dtype=table.dtype, device=table.device)
