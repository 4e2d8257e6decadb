"""Trace capture: one rank of ``megatron-moe-ext analyze``: a checkpoint's model run over token windows, its
routing written as a trace (``trace_format``) by rank 0.

Run by torchrun (``python -m megatron_moe_ext.analysis.capture PLAN.json``); the launcher
(:mod:`megatron_moe_ext.analysis.cli`) has already validated the checkpoint, the layout and the data, and written
the token windows and this plan. The windows are split into global batches of data-parallel size x micro-batch;
data-parallel rank r runs windows [r*B, (r+1)*B) of each; a short last batch is padded with copies of its first
window, whose rows rank 0 drops. Forward passes only (``torch.no_grad``), so memory stays that of inference.

Legend: W windows, S sequence length, B micro-batch, T tokens.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

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

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)

    @classmethod
    def load(cls, path: str) -> CapturePlan:
        with open(path) as f:
            return cls(**json.load(f))


def capture(plan: CapturePlan) -> dict | None:
    """Run the plan on this rank (torch.distributed initialised); returns the trace manifest on rank 0."""
    from megatron.core import parallel_state as ps

    from megatron_moe_ext.analysis.checkpoint_model import analysis_args, read_checkpoint_args
    from megatron_moe_ext.checkpoint.model import load_model
    from megatron_moe_ext.analysis.routing_recorder import RoutingRecorder
    from megatron_moe_ext.analysis.token_windows import TokenWindows
    from megatron_moe_ext.analysis.trace_format import LayerSpec, TraceWriter

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    saved = read_checkpoint_args(plan.iter_dir)
    args = analysis_args(saved, tp=plan.tensor_parallel, ep=plan.expert_parallel, world_size=world, rank=rank,
                         micro_batch_size=plan.micro_batch_size)
    model = load_model(plan.iter_dir, args)
    recorder = RoutingRecorder(model, sequence_parallel=args.sequence_parallel, hidden=plan.hidden,
                               dense=plan.dense)
    windows = TokenWindows.load(plan.windows_file)
    W, S = windows.tokens_WS.shape
    B, dp, dp_rank = plan.micro_batch_size, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    writer = None
    if rank == 0:
        specs = [LayerSpec(layer=s.layer, num_experts=s.num_experts, top_k=s.top_k, num_heads=s.num_heads,
                           hidden_size=s.hidden_size) for s in recorder.layers.values()]
        metadata = {"model": plan.name, "checkpoint": plan.iter_dir, "iteration": plan.iteration,
                    "layer_kinds": {str(n): s.kind for n, s in recorder.layers.items()},
                    "label_names": list(windows.label_names), "seq_length": S,
                    "tensor_parallel": plan.tensor_parallel, "expert_parallel": plan.expert_parallel}
        writer = TraceWriter(plan.trace_dir, specs, has_labels=True, sample_p=plan.sample_p, seed=plan.seed,
                             byte_budget=plan.byte_budget, hidden_dtype=np.float32, metadata=metadata)
    positions_S = np.arange(S, dtype=np.int64)
    position_ids_BS = torch.arange(S, device=device).unsqueeze(0).expand(B, S)
    step = dp * B
    started = time.monotonic()
    try:
        with torch.no_grad():
            for first in range(0, W, step):
                idx = np.arange(first, min(first + step, W))
                real = idx.size
                idx = np.concatenate([idx, np.full(step - real, idx[0])])  # pad a short last batch
                mine = idx[dp_rank * B:(dp_rank + 1) * B]
                tokens_BS = torch.from_numpy(windows.tokens_WS[mine]).to(device)
                model(tokens_BS, position_ids_BS, None)
                rows = recorder.gather(B)
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
    except BaseException:
        if writer is not None:
            writer.__exit__(*sys.exc_info())
        raise
    finally:
        recorder.remove()
    if writer is None:
        return None
    if plan.progress:
        print(file=sys.stderr)
    return writer.close()


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
