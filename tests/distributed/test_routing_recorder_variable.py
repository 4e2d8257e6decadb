"""The routing recorder on our routers with variable experts per token, built by the train entry's builder on 2 gloo
ranks (EP=2): expert choice (causal rule in eval), ReLU and top-k with null experts. Every recorded row equals the
router's own output (Megatron's routing map and probs, plus ``last_null_selection``): real and null selections by
gate, then -1 / gate 0, and the rows write to a version-2 trace.

Legend: T tokens, K slots, N real experts, M null experts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_moe_ext.testing.distributed import run_distributed
from megatron_moe_ext.testing.random_checkpoint import model_flags

CASES = {
    "expert_choice_null": ["--moe-router-type", "expert_choice", "--moe-null-experts", "2",
                           "--moe-token-dispatcher-type", "allgather", "--moe-ec-eval-rule", "token_choice"],
    "relu": ["--moe-router-type", "relu", "--moe-token-dispatcher-type", "allgather"],
    "topk_null": ["--moe-null-experts", "4", "--moe-token-dispatcher-type", "allgather"],
}


def _record(flags: list[str], trace_dir: str) -> dict | None:
    """Rank function: build, randomise, record one forward; rank 0 returns the rows, the specs and the routers'
    own outputs (captured by a second hook)."""
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_moe_ext.analysis.routing_recorder import RoutingRecorder
    from megatron_moe_ext.analysis.trace_format import LayerSpec, TraceReader, TraceWriter
    from megatron_moe_ext.checkpoint.model import build_model
    from megatron_moe_ext.testing.random_checkpoint import fixed_batch, megatron_logits, randomize_
    from megatron_moe_ext.training.rank_entry import parse_rank_args

    args = parse_rank_args(flags)
    model = build_model(args)
    randomize_(model, 0)
    recorder = RoutingRecorder(model, sequence_parallel=args.sequence_parallel)
    own: dict[int, tuple] = {}

    def keep(module, inputs, output):
        null = getattr(module, "last_null_selection", None)
        own[module.layer_number] = (output[0].detach().float(), output[1].detach(),
                                    None if null is None else (null[0].clone(), null[1].clone()))

    for m in model.modules():
        if isinstance(m, TopKRouter):
            m.register_forward_hook(keep)
    tokens_BS = fixed_batch(args.vocab_size, batch=1, seq=16)
    megatron_logits(model, tokens_BS)
    rows = recorder.gather(1)
    if torch.distributed.get_rank() != 0:
        return None
    specs = [LayerSpec(layer=s.layer, num_experts=s.num_experts, top_k=s.top_k, null_experts=s.null_experts,
                       variable=s.variable) for s in recorder.layers.values()]
    # Rows of the global batch, data-parallel rank major: both ranks fed the same tokens.
    T = 2 * tokens_BS.numel()
    with TraceWriter(trace_dir, specs) as w:
        w.append(tokens_BS.reshape(-1).repeat(2), np.arange(T), np.zeros(T, np.int64),
                 {n: (ids, gates) for n, (ids, gates, _) in rows.items()})
    back = {s.layer: TraceReader(trace_dir).load_layer(s.layer).expert_ids_TK for s in specs}
    return {"rows": rows, "specs": specs, "own": own, "back": back}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recorded_rows_equal_the_routers_output(case, tmp_path):
    flags = model_flags(*CASES[case], tp=1, ep=2)
    out = run_distributed(_record, 2, flags, str(tmp_path / "trace"), timeout_s=600)[0]
    N = 4
    for spec in out["specs"]:
        M = {"expert_choice_null": 2, "relu": 0, "topk_null": 4}[case]
        assert (spec.num_experts, spec.null_experts) == (N, M)
        assert spec.variable == (case != "topk_null")
        assert spec.top_k == (N + M if spec.variable else 2)
        ids_TK, gates_TK, _ = out["rows"][spec.layer]
        T = ids_TK.shape[0] // 2  # rank 0's rows first; rank 1 routed the same tokens with the same router
        assert (ids_TK[:T] == ids_TK[T:]).all()
        ids_TK, gates_TK = ids_TK[:T], gates_TK[:T]
        probs_TN, map_TN, null = out["own"][spec.layer]
        if M:
            probs_TN = torch.cat([probs_TN, null[1].float()], dim=-1)
            map_TN = torch.cat([map_TN, null[0]], dim=-1)
        for t in range(ids_TK.shape[0]):
            chosen = [(e, float(g)) for e, g in zip(ids_TK[t], gates_TK[t]) if e >= 0]
            want = {e: float(probs_TN[t, e]) for e in map_TN[t].nonzero().flatten().tolist()}
            assert {e for e, _ in chosen} == set(want), (case, t)
            assert all(abs(g - want[e]) < 1e-6 for e, g in chosen)
            assert [g for _, g in chosen] == sorted((g for _, g in chosen), reverse=True)  # by gate
            assert (ids_TK[t, len(chosen):] == -1).all() and (gates_TK[t, len(chosen):] == 0).all()
        assert (out["back"][spec.layer][:T] == ids_TK).all()
        if case == "relu":
            counts = (ids_TK >= 0).sum(1)
            assert counts.min() < counts.max()  # a variable number of experts per token
        if M:
            assert (ids_TK >= N).any()  # null selections recorded as N..N+M-1
