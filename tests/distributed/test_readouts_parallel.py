"""The rank-side readouts (logit lens, probes) on real Megatron models (the demo GPT, built by the train
entry's builder), driven the way capture drives an instrument (attach, clean forward, on_batch with a rerun,
result): known answers, and EP=2 equal to EP=1. (Loading from torch_dist checkpoints is capture's part.)

The model is the demo model with random weights drawn independently of the layout and one planted expert:
expert 1 of layer 1 writes only along g^-1 * W_U[V_STAR] (its up projection equals its gate projection, so
SwiGLU's silu(x) * x >= 0 and the output is a positive multiple of that direction): through the final norm its
direct logits are W_U W_U[V_STAR] (times a positive scale), largest at V_STAR for random rows in 64 dimensions,
so the logit lens must rank V_STAR first among the tokens that expert promotes, and no other expert does. The
label of a token is its id mod 4, written large into embedding dimensions 0..3, which layer 1's router reads
(its weight is the identity on them): a router whose choice is a deterministic function of the label (checked:
the top-1 expert equals the label for every token), so the probe on that layer's router logits reads the label
at 100% while the shuffled-label control stays near chance. A second model (product-key router in layer 1, a
PEER layer in layer 2) checks what applies there and what is stated as not applicable."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
import torch

from megatron_moe_ext.testing import run_distributed

V_STAR = 37  # the planted token ('%')
PLANTED = (1, 1)  # (layer, global expert)
SEQ, WINDOWS, MICRO = 32, 16, 2
OVERRIDES = ("--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ))
# Layer 1: product-key router (2 x 2 sub-keys); layer 2: a PEER layer (64 experts, 2 heads x top-4) with a shared MLP.
PK_PEER = ("--moe-router-type", "product_key", "--moe-pk-key-dim", "16", "--moe-peer-num-experts", "64",
           "--moe-peer-heads", "2", "--moe-peer-topk", "4", "--moe-peer-key-dim", "16", "--moe-peer-layers", "2",
           "--moe-peer-shared-ffn-hidden-size", "32")


def _text_windows() -> np.ndarray:
    """WINDOWS x SEQ byte tokens of real text (this file), so token classes are meaningful."""
    data = np.frombuffer(open(__file__, "rb").read(), dtype=np.uint8).astype(np.int64)
    return data[: WINDOWS * SEQ].reshape(WINDOWS, SEQ)


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def build_planted_model(ep: int, extra: tuple[str, ...] = ()) -> tuple[torch.nn.Module, Any]:
    """The demo model (sequence SEQ) at EP ``ep`` with random weights that do not depend on the layout (each
    tensor drawn whole, by its name, and sliced to this rank's experts) and the planted expert."""
    from megatron.core import parallel_state as ps

    from megatron_moe_ext.checkpoint.model import build_model
    from megatron_moe_ext.layers.fine_grained_experts import FineGrainedExperts
    from megatron_moe_ext.testing.random_checkpoint import model_flags
    from megatron_moe_ext.training.rank_entry import parse_rank_args

    args = parse_rank_args(model_flags(*OVERRIDES, *extra, ep=ep))
    model = build_model(args)
    E = args.num_experts
    with torch.no_grad():
        for name, param in model.named_parameters():
            expert = not getattr(param, "allreduce", True)
            shape = (E, *param.shape[1:]) if expert else tuple(param.shape)
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(_seed(name)))
            if param.dim() == 1:
                value = 1.0 + 0.2 * noise  # norm scales
            elif name.endswith("router.weight"):
                value = 0.5 * noise  # routing differs between tokens
            else:
                value = noise / shape[-1] ** 0.5
            if expert:
                local = param.shape[0]
                first = ps.get_expert_model_parallel_rank() * local
                value = value[first:first + local]
            param.copy_(value)
        w_u = model.output_layer.weight
        gamma = model.decoder.final_layernorm.weight
        direction = w_u[V_STAR] / gamma  # g * direction = W_U[V_STAR]: logits W_U W_U[V_STAR], largest at V_STAR
        direction = direction / direction.norm()
        # The label (token id mod 4) written large into embedding dimensions 0..3, read by layer 1's router:
        # its top-1 expert is the label.
        emb = model.embedding.word_embeddings.weight
        emb[:, :4] = 0.0
        emb[torch.arange(emb.shape[0]), torch.arange(emb.shape[0]) % 4] = 20.0
        router = model.decoder.layers[0].mlp.router
        if isinstance(getattr(router, "weight", None), torch.Tensor):  # a top-k router (product keys: none)
            router.weight.zero_()
            router.weight[torch.arange(E), torch.arange(E)] = 5.0
        layer, expert = PLANTED
        experts = model.decoder.layers[layer - 1].mlp.experts
        assert isinstance(experts, FineGrainedExperts), type(experts)
        local = experts.linear_fc1.weight.shape[0]
        e = expert - ps.get_expert_model_parallel_rank() * local
        if 0 <= e < local:
            w1, w2 = experts.linear_fc1.weight, experts.linear_fc2.weight  # [E, 2F, H] gate rows first; [E, H, F]
            F = w2.shape[2]
            w1[e, F:] = w1[e, :F]
            w2[e] = 3.0 * direction[:, None].expand(-1, F) / F ** 0.5
    model.eval()
    return model, args


def run_readouts(ep: int, extra: tuple[str, ...] = (), *, tp: int = 1, iter_dir: str | None = None) -> dict | None:
    """Rank function: the planted model at EP ``ep`` (TP 1) on this world; label every token with its layer-1
    top-1 expert, run LogitLens and Probes as capture does; rank 0 returns their results."""
    from megatron.core import parallel_state as ps

    from megatron_moe_ext.analysis.instrument_api import Batch, RankEnv, router_rows
    from megatron_moe_ext.analysis.logit_lens import LogitLens
    from megatron_moe_ext.analysis.probes import Probes

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if iter_dir is None:
        model, args = build_planted_model(ep, extra)
    else:  # the planted model saved by save_planted_checkpoint, loaded at this layout
        from megatron_moe_ext.analysis.checkpoint_model import analysis_args, read_checkpoint_args
        from megatron_moe_ext.checkpoint.model import load_model

        args = analysis_args(read_checkpoint_args(iter_dir), tp=tp, ep=ep, world_size=world, rank=rank,
                             micro_batch_size=MICRO)
        model = load_model(iter_dir, args)
        model.eval()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    env = RankEnv(rank=rank, world_size=world, data_parallel_rank=dp_rank, data_parallel_size=dp,
                  data_parallel_group=ps.get_data_parallel_group(), tensor_parallel_size=tp, expert_parallel_size=ep,
                  sequence_parallel=bool(args.sequence_parallel), seq_length=SEQ, micro_batch_size=MICRO,
                  tensor_parallel_rank=ps.get_tensor_model_parallel_rank(),
                  tensor_parallel_group=ps.get_tensor_model_parallel_group(),
                  label_names=("id%4=0", "id%4=1", "id%4=2", "id%4=3"), seed=5,
                  options={"probe_max_tokens": 400, "probe_test_fraction": 0.25, "probe_c": 1.0}, model_args=args)
    tokens_WS = _text_windows()
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MICRO, SEQ)
    top1: dict[str, torch.Tensor] = {}
    handle = model.decoder.layers[0].mlp.router.register_forward_hook(
        lambda m, i, o: top1.__setitem__("ids", o[0].argmax(-1)))
    instruments = [LogitLens("logit_lens", env), Probes("probes", env)]
    for inst in instruments:
        inst.attach(model, env)
    agree = []
    with torch.no_grad():
        for first in range(0, WINDOWS, dp * MICRO):
            ids = np.arange(first, first + dp * MICRO)[dp_rank * MICRO:(dp_rank + 1) * MICRO]
            tok = torch.from_numpy(tokens_WS[ids])
            mask = np.ones((MICRO, SEQ), bool)
            mask[:, -1] = False
            batch = Batch(ids, np.ones(MICRO, bool), tok, tokens_WS[ids] % 4, mask)  # label = token id mod 4
            targets = torch.cat([tok[:, 1:], tok[:, -1:]], dim=1)

            def run(batch: Batch = batch, targets: torch.Tensor = targets) -> torch.Tensor:
                return model(batch.tokens_BS, position_ids, None, labels=targets).float()

            clean = run()
            window_T, position_T = router_rows(batch, env, top1["ids"].numel())
            agree.append(top1["ids"].numpy() == batch.labels_BS[np.searchsorted(ids, window_T), position_T])
            for inst in instruments:
                inst.on_batch(batch, clean, run)
        handle.remove()
        results = {inst.name: inst.result() for inst in instruments}
    ps.destroy_model_parallel()
    results["router_follows_label"] = float(np.concatenate(agree).mean())
    return results if rank == 0 else None


def run_single_rank() -> dict:
    """Rank function (1 rank): the top-k model at EP 1, then the product-key/PEER model (one start-up)."""
    from megatron.training.global_vars import unset_global_variables

    ep1 = run_readouts(1)
    unset_global_variables()  # the second model parses its own arguments
    return {"ep1": ep1, "pk_peer": run_readouts(1, PK_PEER)}


@pytest.fixture(scope="module")
def runs() -> dict:
    return {"ep2": run_distributed(run_readouts, 2, 2)[0], **run_distributed(run_single_rank, 1)[0]}


def _layer(result: dict, number: int) -> dict:
    return next(x for x in result["layers"] if x["layer"] == number)


def test_logit_lens_ranks_the_planted_token_first(runs) -> None:
    lens = runs["ep2"]["logit_lens"]
    assert lens["decoded"] and lens["vocab_size"] == 257
    layer = _layer(lens, PLANTED[0])
    assert layer["reconstruction_error"] < 1e-5  # the K isolated contributions sum to the layer's output
    experts = {e["expert"]: e for e in layer["experts"]}
    planted = experts[PLANTED[1]]
    assert planted["tokens"] > 0
    assert planted["promoted"][0]["id"] == V_STAR and planted["promoted"][0]["text"] == chr(V_STAR)
    others = [e for n, e in experts.items() if n != PLANTED[1]]
    assert others and all(e["promoted"][0]["id"] != V_STAR for e in others)  # only the planted expert does
    assert sum(e["tokens"] for e in layer["experts"]) == WINDOWS * SEQ * 2  # top-2 of every token
    assert sum(e["best_for_tokens"] for e in layer["experts"]) == layer["scored_tokens"] == WINDOWS * (SEQ - 1)


def test_readouts_equal_at_ep2_and_ep1(runs) -> None:
    a, b = runs["ep2"]["logit_lens"], runs["ep1"]["logit_lens"]
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        assert la["scored_tokens"] == lb["scored_tokens"]
        assert la["mean_layer_correct_logit"] == pytest.approx(lb["mean_layer_correct_logit"], rel=1e-5)
        for ea, eb in zip(la["experts"], lb["experts"], strict=True):
            assert (ea["expert"], ea["tokens"], ea["best_for_tokens"]) == (eb["expert"], eb["tokens"],
                                                                          eb["best_for_tokens"])
            assert [x["id"] for x in ea["promoted"]] == [x["id"] for x in eb["promoted"]]
            assert [x["logit"] for x in ea["promoted"]] == pytest.approx([x["logit"] for x in eb["promoted"]],
                                                                          rel=1e-5, abs=1e-7)
        assert [(x["window"], x["position"], x["expert"]) for x in la["examples"]] == \
               [(x["window"], x["position"], x["expert"]) for x in lb["examples"]]
    pa, pb = runs["ep2"]["probes"], runs["ep1"]["probes"]
    for la, lb in zip(pa["layers"], pb["layers"], strict=True):
        assert la["sampled_tokens"] == lb["sampled_tokens"] == 400
        for name, x in la["probes"].items():
            y = lb["probes"][name]
            assert x["test_tokens"] == y["test_tokens"] and x["majority_accuracy"] == y["majority_accuracy"]
            assert x["accuracy"] == pytest.approx(y["accuracy"], abs=1.5 / x["test_tokens"])  # one token at most


def test_probe_reads_a_label_the_router_decides(runs) -> None:
    probes = runs["ep2"]["probes"]
    layer = _layer(probes, 1)
    assert layer["router_features"] == "router logits"
    router = layer["probes"]["router/labels"]
    assert runs["ep2"]["router_follows_label"] == 1.0
    assert router["accuracy"] == 1.0, router
    assert layer["probes"]["hidden/labels"]["accuracy"] >= 0.95  # 64 noisier dimensions, same 300 tokens
    assert router["control_accuracy"] < router["majority_accuracy"] + 0.15  # shuffled labels: no better than chance
    assert router["selectivity"] > 0.5
    assert "accuracy" in layer["probes"]["hidden/token_class"]  # byte tokenizer: token classes decoded
    from megatron_moe_ext.analysis import logit_lens, probes as probes_module

    md = probes_module.report_section(probes, "unused") + logit_lens.report_section(runs["ep2"]["logit_lens"], "unused")
    assert "| 1 | moe | router logits | labels |" in md and "## Expert logit lens" in md


def test_product_key_router_and_peer_layer(runs) -> None:
    """Product keys: per-expert lens (K isolated calls) and half-score probes; PEER: per-token only, and no
    router probe (both stated as not applicable)."""
    lens, probes = runs["pk_peer"]["logit_lens"], runs["pk_peer"]["probes"]
    pk, peer = _layer(lens, 1), _layer(lens, 2)
    assert pk["kind"] == "moe" and pk["reconstruction_error"] < 1e-5
    planted = next(e for e in pk["experts"] if e["expert"] == PLANTED[1])
    assert planted["promoted"][0]["id"] == V_STAR
    assert peer["kind"] == "peer" and "not_applicable" in peer["experts"]
    assert peer["scored_tokens"] == WINDOWS * (SEQ - 1) and np.isfinite(peer["mean_layer_correct_logit"])
    assert _layer(probes, 1)["router_features"] == "product-key half scores"
    assert _layer(probes, 1)["probes"]["router/labels"]["accuracy"] >= 0.9  # half scores, not the logits
    assert "not_applicable" in _layer(probes, 2)["probes"]["router/labels"]
    assert "accuracy" in _layer(probes, 2)["probes"]["hidden/labels"]
