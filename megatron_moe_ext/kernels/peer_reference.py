"""PEER experts and gates, the pure-torch reference (He 2024, "Mixture of A Million Experts", arXiv 2407.04153).

out[t] = sum over the pairs p of token t of  g_p * act(u[e_p] . x[t]) * v[e_p]

with the selected (token, expert) pairs in token-major CSR form: ``offsets_T1`` [T+1] delimits each token's run of
pairs in ``ids_P`` (table rows) and ``gates_P``. This defines the semantics every backend of
``kernels/peer_experts.py`` reproduces; ``peer_gates`` turns a head's k retrieval scores into its gates.

One implementation for training and export: ``layers/peer.py`` and ``kernels/peer_experts.py`` use these
functions, and the Hugging Face export copies this file unchanged next to the remote-code model
(``checkpoint/remote_code/``), so it imports torch and the standard library only.

Legend: T tokens, h hidden size, N table rows, P selected pairs, H heads, k experts per head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Activations and gates in fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(x.dtype, torch.float32)


def pair_tokens(offsets_T1: Tensor, num_pairs: int) -> Tensor:
    """Token index of every pair, [P] int64, from the CSR offsets."""
    counts_T = offsets_T1[1:] - offsets_T1[:-1]
    return torch.repeat_interleave(torch.arange(counts_T.numel(), device=offsets_T1.device), counts_T, output_size=num_pairs)


def uniform_offsets(num_tokens: int, per_token: int, device: torch.device | str) -> Tensor:
    """CSR offsets of ``per_token`` pairs for each of ``num_tokens`` tokens."""
    return torch.arange(num_tokens + 1, device=device, dtype=torch.int64) * per_token


def peer_experts_reference(x_Th: Tensor, u_Nh: Tensor, v_Nh: Tensor, ids_P: Tensor, gates_P: Tensor, offsets_T1: Tensor, activation: str = "gelu") -> Tensor:
    """The semantics: gather, dot, activate, scale, scatter-add, all under autograd."""
    tok_P = pair_tokens(offsets_T1, ids_P.numel())
    s_P = (u_Nh[ids_P] * x_Th[tok_P]).sum(-1)
    z_P = ACTIVATIONS[activation](s_P) * gates_P
    out_Th = x_Th.new_zeros(x_Th.shape)
    return out_Th.index_add(0, tok_P, (z_P.unsqueeze(-1) * v_Nh[ids_P]).to(x_Th.dtype))


def peer_gates(scores_THk: Tensor, gate: str) -> Tensor:
    """Gates of each head's k selected experts from their retrieval scores: 'softmax' over the k, or 'sigmoid'
    of each (computed in the scores' dtype: the layer passes fp32)."""
    if gate == "softmax":
        return torch.softmax(scores_THk, dim=-1)
    if gate == "sigmoid":
        return torch.sigmoid(scores_THk)
    raise ValueError(f"PEER gate {gate!r} is unknown; choose softmax or sigmoid")
