"""Randomised models saved as real torch_dist checkpoints, with their Megatron logits: the fixture of the
conversion tests.

A rank function for :func:`megatron_moe_ext.testing.distributed.run_distributed`: it parses train flags exactly
as the train entry does (Megatron's parser plus ours, validated for this world), builds the model through the
same builder and specs, sets *every* parameter and float buffer to random values (norms 1 +- 0.2, router
weights and expert bias large enough to change selections, PEER keys, batch-norm running statistics), runs
Megatron's forward on a fixed batch at the saved parallel layout, and saves the checkpoint with
``megatron.training``'s own ``save_checkpoint`` (args in the common state, as a training run writes them).

Values are drawn per global tensor name and per tensor/expert-parallel shard, so replicas agree and shards
differ: a converter that swaps two TP halves or two EP ranks changes the logits.

Legend: B batch, S sequence, V (padded) vocabulary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from megatron_moe_ext.runtime.rank import CPU_ARGS
from megatron_moe_ext.training.train import (
    _GRANULARITY_FLAGS,
    _SIZING_FLAGS,
    DEFAULT_MODEL_ARGS,
    _without,
)

# Flags a randomised test model always takes on top of the embedded default (no training-only extras).
_TEST_ARGS: tuple[str, ...] = (
    "--micro-batch-size", "1",
    "--global-batch-size", "4",
    "--moe-aux-loss-coeff", "0",
    "--moe-z-loss-coeff", "0",
    "--moe-router-load-balancing-type", "none",
)


def model_flags(*overrides: str, tp: int = 1, ep: int = 1) -> list[str]:
    """CPU flags + the embedded default model + ``overrides`` (later flags win), at TP ``tp`` / EP ``ep``.
    Sequence parallelism follows Megatron's rule for MoE (on exactly when TP > 1)."""
    # No optimizer is built: drop the default's distributed optimizer (it has no --no- form).
    defaults = [f for f in DEFAULT_MODEL_ARGS if f != "--use-distributed-optimizer"]
    if any(a.split("=", 1)[0] in _GRANULARITY_FLAGS for a in overrides):
        defaults = _without(defaults, _SIZING_FLAGS)  # as the train entry does
    flags = [*CPU_ARGS, *defaults, *_TEST_ARGS, *overrides,
             "--tensor-model-parallel-size", str(tp), "--expert-model-parallel-size", str(ep)]
    if tp > 1:
        flags.append("--sequence-parallel")
    return flags


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _shard_tag(param: torch.Tensor) -> tuple[int, int]:
    """(tp rank, ep rank) where the tensor is sharded over them, -1 where it is replicated."""
    from megatron.core import parallel_state as ps

    tp = -1
    if getattr(param, "tensor_model_parallel", False):
        is_expert = not getattr(param, "allreduce", True)
        tp = ps.get_expert_tensor_parallel_rank() if is_expert else ps.get_tensor_model_parallel_rank()
    ep = ps.get_expert_model_parallel_rank() if not getattr(param, "allreduce", True) else -1
    return tp, ep


def _random_like(name: str, tensor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    shape, dtype = tensor.shape, tensor.dtype
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        out = 0.5 + torch.rand(shape, generator=gen)
    elif leaf == "running_mean" or leaf.endswith("bias"):  # linear, expert and query biases; selection biases
        out = 0.2 * noise
    elif tensor.dim() == 1 or "norm" in name:
        out = 1.0 + 0.2 * noise  # norm scales (and any other vector parameter)
    elif name.endswith("router.weight"):
        out = 0.5 * noise  # large enough that top-k choices differ between tokens
    elif leaf in ("row_keys", "col_keys"):
        out = noise
    else:
        out = noise / max(shape[-1], 1) ** 0.5
    return out.to(dtype)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and floating buffer of ``model`` to random values, equal on replicas."""
    from megatron_moe_ext.testing.tiny import global_name

    config = model.config
    with torch.no_grad():
        for name, param in model.named_parameters():
            gname = global_name(name, config, tied_embeddings=model.share_embeddings_and_output_weights)
            gen = torch.Generator().manual_seed(_seed(seed, gname, *_shard_tag(param)))
            param.copy_(_random_like(gname, param, gen))
        for name, buf in model.named_buffers():
            if not buf.is_floating_point() or "local_tokens_per_expert" in name:
                continue
            gname = global_name(name, config)
            gen = torch.Generator().manual_seed(_seed(seed, gname, "buffer"))
            buf.copy_(_random_like(gname, buf, gen))


def fixed_batch(vocab_size: int, *, batch: int = 2, seq: int = 24, seed: int = 7) -> torch.Tensor:
    """Token ids [B, S] below ``vocab_size`` (the real, unpadded vocabulary)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)


def megatron_logits(model: torch.nn.Module, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Megatron's logits [B, S, V] (vocabulary gathered over TP), eval mode, causal attention."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    B, S = tokens_BS.shape
    position_ids_BS = torch.arange(S).unsqueeze(0).expand(B, S)
    with torch.no_grad():
        logits_BSV = model(tokens_BS, position_ids_BS, None)
        return gather_from_tensor_model_parallel_region(logits_BSV).float()


def megatron_greedy(model: torch.nn.Module, tokens_BS: torch.Tensor, steps: int, *,
                    pad_to: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation [B, S + steps] by full forwards (no cache), and each step's top-2 logit margin
    [B, steps] (how far the chosen token led the runner-up: a step whose margin is within the logits tolerance
    is a near-tie another implementation may break the other way). Sequences are padded at the end to a
    multiple of ``pad_to`` (sequence parallelism splits the sequence over TP); causal attention and per-token
    routing keep the padding from reaching earlier positions."""
    out_BS = tokens_BS
    margins = []
    for _ in range(steps):
        S = out_BS.shape[1]
        padded = -(-S // pad_to) * pad_to
        inp_BS = torch.cat([out_BS, out_BS[:, : padded - S]], dim=1) if padded > S else out_BS
        last_BV = megatron_logits(model, inp_BS)[:, S - 1]
        top2_B2 = last_BV.topk(2, dim=-1).values
        margins.append(top2_B2[:, 0] - top2_B2[:, 1])
        out_BS = torch.cat([out_BS, last_BV.argmax(-1)[:, None]], dim=1)
    return out_BS, (torch.stack(margins, dim=1) if margins else tokens_BS.new_zeros(tokens_BS.shape[0], 0).float())


def assert_greedy_equal(greedy_BS: torch.Tensor, ref_BS: torch.Tensor, margins_BT: torch.Tensor, *,
                        tolerance: float) -> int:
    """Greedy tokens equal the reference's up to each row's first near-tie: a step whose top-2 logit margin in
    the reference is at most ``2 * tolerance`` (two implementations that agree to ``tolerance`` may break such a
    tie either way, and every later token depends on it). Returns the number of steps compared over all rows;
    raises AssertionError naming the first differing step otherwise."""
    assert greedy_BS.shape == ref_BS.shape, (tuple(greedy_BS.shape), tuple(ref_BS.shape))
    B, total = ref_BS.shape
    steps = margins_BT.shape[1]
    prompt = total - steps
    compared = 0
    for b in range(B):
        ties = (margins_BT[b] <= 2 * tolerance).nonzero()
        n = int(ties[0]) + 1 if len(ties) else steps  # the tie step itself may go either way
        upto = prompt + n - (1 if len(ties) else 0)
        diff = (greedy_BS[b, :upto] != ref_BS[b, :upto]).nonzero()
        assert len(diff) == 0, (f"row {b}: greedy token {int(diff[0]) - prompt} differs before any near-tie "
                                f"(first near-tie at step {n - 1 if len(ties) else 'none'})")
        compared += upto - prompt
    return compared


def save_random_checkpoint(flags: Sequence[str], save_dir: str, *, iteration: int = 1, seed: int = 0,
                           tokens_BS: torch.Tensor | None = None, greedy_steps: int = 0) -> dict | None:
    """Rank function: parse ``flags``, build, randomise, forward, save ``save_dir/iter_<iteration>``.

    Returns on rank 0 ``{"tokens": [B, S], "logits": [B, S, V], "greedy": [B, S + greedy_steps],
    "greedy_margins": [B, greedy_steps], "padded_vocab_size": V}`` (``greedy*`` only with ``greedy_steps``)."""
    from megatron.core import parallel_state as ps
    from megatron.training.checkpointing import save_checkpoint

    from megatron_moe_ext.checkpoint.model import build_model
    from megatron_moe_ext.training.rank_entry import parse_rank_args

    args = parse_rank_args([*flags, "--save", save_dir, "--ckpt-format", "torch_dist"])
    model = build_model(args)
    randomize_(model, seed)
    if tokens_BS is None:
        tokens_BS = fixed_batch(args.vocab_size or args.padded_vocab_size)
    logits_BSV = megatron_logits(model, tokens_BS)
    greedy_BS = margins_BT = None
    if greedy_steps:
        pad_to = args.tensor_model_parallel_size if args.sequence_parallel else 1
        greedy_BS, margins_BT = megatron_greedy(model, tokens_BS, greedy_steps, pad_to=pad_to)
    args.iteration = iteration
    save_checkpoint(iteration, [model], None, None, 0)
    torch.distributed.barrier()
    ps.destroy_model_parallel()
    if torch.distributed.get_rank() != 0:
        return None
    return {"tokens": tokens_BS, "logits": logits_BSV, "greedy": greedy_BS, "greedy_margins": margins_BT,
            "padded_vocab_size": args.padded_vocab_size}
