"""Trace capture: one rank of ``megatron-moe-ext analyze``: a checkpoint's model run over token windows, its
routing written as a trace (``trace_format``) by rank 0.

Run by torchrun (``python -m megatron_moe_ext.analysis.capture PLAN.json``); the launcher
(:mod:`megatron_moe_ext.analysis.cli`) has already validated the checkpoint, the layout and the data, and written
the token windows and this plan. The windows are split into global batches of data-parallel size x micro-batch;
data-parallel rank r runs windows [r*B, (r+1)*B) of each; a short last batch is padded with copies of its first
window, whose rows rank 0 drops. Forward passes only (``torch.no_grad``), so memory stays that of inference.

The clean pass also computes the per-token next-token loss (Megatron's GPTModel forward with ``labels``: the
cross entropy of token s+1 given tokens <= s, [B, S], gathered over TP). A window's last position has no next
token inside the window: its label is a placeholder, its loss is set to 0 and ``Batch.loss_mask_BS`` is False
there (windows are not extended to S+1 tokens, so the trace, the windows and the loss see the same S tokens).
The instruments of the plan (``instrument_api``) ride along: attached once, ``calibrate`` first over every batch
when an instrument defines it (a clean pass of its own, nothing traced), then ``on_batch`` after each clean
forward, ``result`` at the end; rank 0 writes ``{name: result}`` to ``instruments.json`` in the trace directory
(temporary file, then ``os.replace``).

Legend: W windows, S sequence length, B micro-batch, T tokens.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class CapturePlan:
    """Everything a capture rank needs (written as JSON by the launcher)."""

    iter_dir: str
    windows_file: str
    trace_dir: str
    iteration: int = 0
    tensor_parallel: int = 1
    expert_parallel: int = 1
    micro_batch_size: int = 4
    hidden: bool = False
    dense: bool = False
    sample_p: float = 1.0
    seed: int = 0
    byte_budget: int | None = None
    progress: bool = False
    name: str = "model"
    instruments: tuple[str, ...] = ()  # rank-side instruments (instrument_api.INSTRUMENTS names), in this order
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # instrument options (RankEnv.options)
    readouts: tuple[str, ...] = ()  # trace readouts the report computes (trace metadata "readouts")
    role: str | None = None  # the model's role in a sweep comparison (trace metadata "role")

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)

    @classmethod
    def load(cls, path: str) -> CapturePlan:
        with open(path) as f:
            fields = json.load(f)
        for key in ("instruments", "readouts"):
            fields[key] = tuple(fields.get(key, ()))
        return cls(**fields)


def next_token_labels(tokens_BS: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """(labels_BS, loss_mask_BS): label of position s is token s+1 of the same window; the last position has
    none (its label repeats its own token as a placeholder, its mask is False)."""
    labels_BS = torch.cat([tokens_BS[:, 1:], tokens_BS[:, -1:]], dim=1)
    mask_BS = np.ones(tuple(tokens_BS.shape), dtype=bool)
    mask_BS[:, -1] = False
    return labels_BS, mask_BS


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
    os.replace(tmp, path)


def _rank_env(plan: CapturePlan, args: Any, label_names: tuple[str, ...], seq_length: int) -> Any:
    from megatron.core import parallel_state as ps

    from megatron_moe_ext.analysis.instrument_api import RankEnv

    return RankEnv(
        rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
        data_parallel_rank=ps.get_data_parallel_rank(), data_parallel_size=ps.get_data_parallel_world_size(),
        data_parallel_group=ps.get_data_parallel_group(), tensor_parallel_size=plan.tensor_parallel,
        expert_parallel_size=plan.expert_parallel, sequence_parallel=bool(args.sequence_parallel),
        seq_length=seq_length, micro_batch_size=plan.micro_batch_size, label_names=label_names, seed=plan.seed,
        options=dict(plan.options), tensor_parallel_rank=ps.get_tensor_model_parallel_rank(),
        tensor_parallel_group=ps.get_tensor_model_parallel_group(), model_args=args)


def _batches(windows: Any, *, B: int, dp: int, dp_rank: int, device: torch.device) -> Iterator[tuple[int, np.ndarray, Any]]:
    """(first window, global batch window ids padded to dp*B, this rank's Batch) over all windows."""
    from megatron_moe_ext.analysis.instrument_api import Batch

    W = windows.tokens_WS.shape[0]
    step = dp * B
    for first in range(0, W, step):
        idx = np.arange(first, min(first + step, W))
        real = idx.size
        real_G = np.arange(step) < real
        idx = np.concatenate([idx, np.full(step - real, idx[0])])  # pad a short last batch
        mine = slice(dp_rank * B, (dp_rank + 1) * B)
        tokens_BS = torch.from_numpy(windows.tokens_WS[idx[mine]]).to(device)
        _, mask_BS = next_token_labels(tokens_BS)
        yield first, idx, Batch(window_ids_B=idx[mine], real_B=real_G[mine], tokens_BS=tokens_BS,
                                labels_BS=windows.labels_WS[idx[mine]], loss_mask_BS=mask_BS)


def _loss_fn(model: torch.nn.Module, batch: Any, position_ids_BS: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The per-token next-token loss [B, S] (float32, 0 where the mask is False) of one forward on ``batch``."""
    labels_BS, _ = next_token_labels(batch.tokens_BS)
    mask_BS = torch.from_numpy(batch.loss_mask_BS).to(batch.tokens_BS.device)

    def run() -> torch.Tensor:
        loss_BS = model(batch.tokens_BS, position_ids_BS, None, labels=labels_BS)
        return torch.where(mask_BS, loss_BS.float(), torch.zeros((), dtype=torch.float32, device=loss_BS.device))

    return run


def capture(plan: CapturePlan) -> dict | None:
    """Run the plan on this rank (torch.distributed initialised); returns the trace manifest on rank 0."""
    from megatron.core import parallel_state as ps

    from megatron_moe_ext.analysis.checkpoint_model import analysis_args, read_checkpoint_args
    from megatron_moe_ext.analysis.instrument_api import load_entry
    from megatron_moe_ext.analysis.routing_recorder import RoutingRecorder
    from megatron_moe_ext.analysis.token_windows import TokenWindows
    from megatron_moe_ext.analysis.trace_format import LayerSpec, TraceWriter
    from megatron_moe_ext.checkpoint.model import load_model

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    saved = read_checkpoint_args(plan.iter_dir)
    args = analysis_args(saved, tp=plan.tensor_parallel, ep=plan.expert_parallel, world_size=world, rank=rank,
                         micro_batch_size=plan.micro_batch_size)
    model = load_model(plan.iter_dir, args)
    model.eval()
    windows = TokenWindows.load(plan.windows_file)
    W, S = windows.tokens_WS.shape
    B, dp, dp_rank = plan.micro_batch_size, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    env = _rank_env(plan, args, tuple(windows.label_names), S)
    instruments = [load_entry(name)(name, env) for name in plan.instruments]
    for inst in instruments:
        inst.attach(model, env)
    position_ids_BS = torch.arange(S, device=device).unsqueeze(0).expand(B, S)
    calibrating = [inst for inst in instruments
                   if hasattr(inst, "calibrate") and getattr(inst, "needs_calibration", True)]
    if calibrating:  # a clean pass of its own before the traced one (e.g. the global load of each expert)
        with torch.no_grad():
            for _, _, batch in _batches(windows, B=B, dp=dp, dp_rank=dp_rank, device=device):
                clean_loss_BS = _loss_fn(model, batch, position_ids_BS)()
                for inst in calibrating:
                    inst.calibrate(batch, clean_loss_BS)
    recorder = RoutingRecorder(model, sequence_parallel=args.sequence_parallel, hidden=plan.hidden,
                               dense=plan.dense)
    writer = None
    if rank == 0:
        specs = [LayerSpec(layer=s.layer, num_experts=s.num_experts, top_k=s.top_k, num_heads=s.num_heads,
                           hidden_size=s.hidden_size, null_experts=s.null_experts, variable=s.variable) for s in recorder.layers.values()]
        metadata = {"model": plan.name, "checkpoint": plan.iter_dir, "iteration": plan.iteration,
                    "layer_kinds": {str(n): s.kind for n, s in recorder.layers.items()},
                    "label_names": list(windows.label_names), "seq_length": S,
                    "tensor_parallel": plan.tensor_parallel, "expert_parallel": plan.expert_parallel,
                    "instruments": list(plan.instruments), "readouts": list(plan.readouts)}
        if plan.role is not None:
            metadata["role"] = plan.role
        writer = TraceWriter(plan.trace_dir, specs, has_labels=True, sample_p=plan.sample_p, seed=plan.seed,
                             byte_budget=plan.byte_budget, hidden_dtype=np.float32, metadata=metadata)
    positions_S = np.arange(S, dtype=np.int64)
    started = time.monotonic()
    try:
        with torch.no_grad():
            for first, idx, batch in _batches(windows, B=B, dp=dp, dp_rank=dp_rank, device=device):
                real = min(idx.size, W - first)
                run = _loss_fn(model, batch, position_ids_BS)
                clean_loss_BS = run()
                rows = recorder.gather(B)
                if instruments:
                    for inst in instruments:
                        inst.on_batch(batch, clean_loss_BS, run)
                if writer is not None:
                    keep = real * S  # rows are (window, position) over the padded batch: drop the padding
                    writer.append(
                        windows.tokens_WS[idx[:real]].reshape(-1),
                        np.tile(positions_S, real),
                        windows.documents_WS[idx[:real]].reshape(-1),
                        {n: (ids[:keep], gates[:keep]) for n, (ids, gates, _) in rows.items()},
                        labels_T=windows.labels_WS[idx[:real]].reshape(-1),
                        hidden={n: h[:keep] for n, (_, _, h) in rows.items() if h is not None},
                    )
                    if plan.progress:
                        done = first + real
                        rate = done * S / max(time.monotonic() - started, 1e-9)
                        print(f"\r[{plan.name}] {done}/{W} windows ({rate:,.0f} tokens/s)", end="",
                              file=sys.stderr, flush=True)
        results = {inst.name: inst.result() for inst in instruments}  # collective: every rank
    except BaseException:
        if writer is not None:
            writer.__exit__(*sys.exc_info())
        raise
    finally:
        recorder.remove()
        for inst in instruments:
            detach = getattr(inst, "detach", None)
            if detach is not None:
                detach()
    if writer is None:
        return None
    if plan.progress:
        print(file=sys.stderr)
    manifest = writer.close()
    if instruments:
        from megatron_moe_ext.analysis.summary import INSTRUMENTS_FILE

        _write_json_atomic(os.path.join(plan.trace_dir, INSTRUMENTS_FILE), results)
    return manifest


def main(argv: list[str]) -> None:
    """Rank entry: ``capture.py PLAN.json [PLAN.json ...]`` under torchrun (gloo on CPU); several plans (compare)
    run one after the other in the same ranks, so the start-up is paid once."""
    if not argv:
        raise SystemExit("usage: python -m megatron_moe_ext.analysis.capture PLAN.json [PLAN.json ...]")
    from megatron_moe_ext.runtime.rank import setup_rank

    if torch.cuda.is_available():
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl")
    setup_rank("analysis")  # without CUDA: the CPU runtime and gloo
    from megatron.core import parallel_state as ps

    for plan_file in argv:
        capture(CapturePlan.load(plan_file))
        torch.distributed.barrier()
        ps.destroy_model_parallel()  # the next model may have another layout
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
