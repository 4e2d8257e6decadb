"""Interventions of ``analyze`` (analysis/interventions.py) on a known-answer model, through the capture ranks.

The model (built here, saved as a real torch_dist checkpoint) is the embedded default (2 layers, hidden 64,
4 SwiGLU experts top-2) with weights set so the answer is known: attention outputs zero (no token mixing), the
embedding of every label-A token ('a'..'m') is e0 plus small noise, every other token e1 plus noise; layer 1's
router sends A tokens to experts {0, 3} and the others to {1, 2}; only expert 0 of layer 1 computes anything
(its output is a large e2), layer 2's experts output zero, and the output layer gives the A vocabulary a large
logit along e2. So expert 0 alone makes label A predictable: ablating it must raise A's loss by nats and leave
every other token's loss exactly unchanged, while ablating expert 3 (selected by the same tokens, output zero)
changes nothing.

Every intervention is captured at EP=2, EP=1 and TP=2 with sequence parallelism; the results must agree.

Legend: W windows, S sequence length, V vocabulary (padded), H hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_moe_ext.analysis.capture import CapturePlan
from megatron_moe_ext.analysis.capture import main as capture_main
from megatron_moe_ext.analysis.token_windows import TokenWindows
from megatron_moe_ext.testing import run_distributed
from megatron_moe_ext.testing.random_checkpoint import model_flags

A_VOCAB = list(range(ord("a"), ord("m") + 1))
S = 128
LABELS = ("A", "B")
# (tp, ep, nproc): the reference first
LAYOUTS = ((1, 2, 2), (1, 1, 1), (2, 1, 2))
OPTIONS = {"ablate_experts": [[1, 0], [1, 3]], "ablate_top_m": [1], "ablate_layers": [1], "renormalize": False,
           "topk_values": [1, 3], "frozen_paths": [1, 0], "copy_routing": [[1, 2], [2, 1]], "hurt_tokens": 5}
NAMES = ("expert_ablation", "topk_change", "random_routing", "frozen_paths", "layer_copy")


def _known_answer_checkpoint(save_dir: str) -> None:
    """Rank function: the known-answer model (module docstring) saved at iteration 1 (TP=1, EP=1)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.training.checkpointing import save_checkpoint

    from megatron_moe_ext.checkpoint.model import build_model
    from megatron_moe_ext.testing.random_checkpoint import randomize_
    from megatron_moe_ext.training.rank_entry import parse_rank_args

    args = parse_rank_args([*model_flags(), "--save", save_dir, "--ckpt-format", "torch_dist"])
    model = build_model(args)
    randomize_(model, seed=3)
    H = args.hidden_size
    e = torch.eye(H)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, p in params.items():
            if name.endswith("linear_proj.weight"):
                p.zero_()  # attention adds nothing: tokens do not mix
            if "layernorm" in name:
                p.fill_(1.0)
        emb_VH = params["embedding.word_embeddings.weight"]
        noise_VH = 0.05 * torch.randn(emb_VH.shape, generator=gen)
        noise_VH[:, :4] = 0
        emb_VH.copy_(e[1].expand_as(emb_VH) + noise_VH)
        emb_VH[A_VOCAB] = e[0] + noise_VH[A_VOCAB]
        params["decoder.layers.0.mlp.router.weight"].copy_(torch.stack([e[0], e[1], 0.5 * e[1], 0.5 * e[0]]))
        fc1_EFH = params["decoder.layers.0.mlp.experts.linear_fc1.weight"]  # [E, 2F, H]: gate rows, then up rows
        fc2_EHF = params["decoder.layers.0.mlp.experts.linear_fc2.weight"]
        F = fc2_EHF.shape[-1]
        fc1_EFH.zero_()
        fc2_EHF.zero_()
        fc1_EFH[0, 0] = e[0]
        fc1_EFH[0, F] = e[0]
        fc2_EHF[0, :, 0] = 4.0 / H * e[2]
        params["decoder.layers.1.mlp.experts.linear_fc2.weight"].zero_()
        out_VH = params["output_layer.weight"]
        out_VH.zero_()
        out_VH[A_VOCAB] = 2.0 * e[2]
    args.iteration = 1
    save_checkpoint(1, [model], None, None, 0)
    torch.distributed.barrier()
    ps.destroy_model_parallel()


def _windows(path: Path) -> None:
    """4 windows of label A ('a'..'m'), then 2 of label B ('n'..'z' and punctuation)."""
    rng = np.random.default_rng(0)
    b_vocab = np.array([t for t in range(32, 127) if t not in A_VOCAB])
    tokens_WS = np.concatenate([rng.choice(A_VOCAB, (4, S)), rng.choice(b_vocab, (2, S))]).astype(np.int64)
    labels_WS = np.repeat(np.array([0, 0, 0, 0, 1, 1]), S).reshape(6, S)
    TokenWindows(tokens_WS, np.repeat(np.arange(6), S).reshape(6, S), labels_WS, LABELS).save(str(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("interventions")
    ckpt = root / "ckpt"
    run_distributed(_known_answer_checkpoint, 1, str(ckpt))
    _windows(root / "windows.npz")
    results = {}
    for tp, ep, nproc in LAYOUTS:
        trace = root / f"trace-tp{tp}-ep{ep}"
        plan = CapturePlan(iter_dir=str(ckpt / "iter_0000001"), windows_file=str(root / "windows.npz"),
                           trace_dir=str(trace), iteration=1, tensor_parallel=tp, expert_parallel=ep,
                           micro_batch_size=2, instruments=NAMES, options=OPTIONS, readouts=("coactivation",))
        plan_file = root / f"plan-tp{tp}-ep{ep}.json"
        plan.save(str(plan_file))
        run_distributed(capture_main, nproc, [str(plan_file)])
        results[(tp, ep, nproc)] = {"instruments": json.loads((trace / "instruments.json").read_text()),
                                    "schema": json.loads((trace / "schema.json").read_text()), "trace": trace}
    return {"root": root, "ckpt": ckpt, "results": results}


def _variant(result: dict, name: str) -> dict:
    return next(v for v in result["variants"] if v["name"] == name)


def test_ablating_the_expert_of_a_label_hurts_only_that_label(runs) -> None:
    ablation = runs["results"][LAYOUTS[0]]["instruments"]["expert_ablation"]
    assert ablation["clean"]["tokens"] == 6 * (S - 1)  # the last position of a window has no next token
    clean_a = ablation["clean"]["per_label"]["A"]["loss"]
    assert clean_a < np.log(len(A_VOCAB)) + 0.1  # expert 0 makes the next token one of the 13 A tokens
    hit = _variant(ablation, "layer 1 expert 0")
    # Without expert 0 the logits are flat over the padded vocabulary (384): log 384 = 5.95 nats.
    assert hit["per_label"]["A"]["delta"] > 3.0
    assert hit["per_label"]["A"]["loss"] == pytest.approx(np.log(384), abs=1e-3)
    assert hit["per_label"]["B"]["delta"] == 0.0
    assert all(t["label"] == "A" for t in hit["hurt_tokens"]) and len(hit["hurt_tokens"]) == 5
    # Expert 3 takes the same tokens but outputs nothing: no change at all.
    idle = _variant(ablation, "layer 1 expert 3")
    assert idle["delta"] == 0.0 and idle["per_label"]["A"]["delta"] == 0.0
    # The whole routed part of layer 1 is expert 0's effect; the busiest expert of layer 1 (a 512-token tie of
    # experts 0 and 3, broken to the lower id) is expert 0.
    assert _variant(ablation, "layer 1: all routed experts")["delta"] == pytest.approx(hit["delta"], abs=1e-9)
    busiest = _variant(ablation, "top-1 busiest experts of every router layer")
    assert busiest["experts_by_layer"]["1"] == [0]
    assert busiest["calibration_load"]["1"] == [4 * S, 2 * S, 2 * S, 4 * S]
    assert busiest["delta"] == pytest.approx(hit["delta"], abs=1e-9)


def test_random_routing_keeps_load_and_all_paths_keep_the_clean_loss(runs) -> None:
    for layout, run in runs["results"].items():
        res = run["instruments"]
        assert all(v["load_preserved"] for v in res["random_routing"]["variants"]), layout
        every = _variant(res["frozen_paths"], "all observed paths")
        assert every["delta"] == 0.0 and every["tokens_rerouted_fraction"] == 0.0, layout
        assert every["calibration_tokens_on_allowed_paths"] == 1.0
        one = _variant(res["frozen_paths"], "1 most frequent paths")
        assert one["paths_used"] == 1 and 0 < one["tokens_rerouted_fraction"] < 1
    meta = runs["results"][LAYOUTS[0]]["schema"]["metadata"]
    assert meta["instruments"] == list(NAMES) and meta["readouts"] == ["coactivation"]


def test_every_intervention_is_equal_at_ep2_ep1_and_tp2_sp(runs) -> None:
    ref = runs["results"][LAYOUTS[0]]["instruments"]
    assert sorted(ref) == sorted(NAMES)
    for layout in LAYOUTS[1:]:
        other = runs["results"][layout]["instruments"]
        for name in NAMES:
            assert "not_applicable" not in ref[name], (name, ref[name])
            a, b = ref[name]["variants"], other[name]["variants"]
            assert [v["name"] for v in a] == [v["name"] for v in b], (layout, name)
            for va, vb in zip(a, b):
                assert va["tokens"] == vb["tokens"]
                assert vb["loss"] == pytest.approx(va["loss"], rel=1e-6, abs=1e-6), (layout, name, va["name"])
                for label, pa in va["per_label"].items():
                    assert vb["per_label"][label]["delta"] == pytest.approx(pa["delta"], abs=1e-5)
                for key in ("load_preserved", "tokens_rerouted_fraction", "experts_by_layer", "paths_used"):
                    assert va.get(key) == vb.get(key), (layout, name, va["name"], key)


def _cli_error(argv: list[str], capsys) -> str:
    from megatron_moe_ext.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bad_intervention_input_fails_before_any_rank_starts(runs, tmp_path, capsys) -> None:
    ckpt = str(runs["ckpt"])
    out = str(tmp_path / "report")
    cases = [
        (["--interventions", "expert_ablation", "--ablate-experts", "3:0"], "no router in layer 3"),
        (["--interventions", "expert_ablation", "--ablate-experts", "1:4"], "layer 1 has experts 0..3"),
        (["--interventions", "expert_ablation", "--ablate-top-m", "4"], "--ablate-top-m 4: must be in 1..3"),
        (["--interventions", "layer_copy", "--copy-routing", "2:2"], "a layer copied onto itself"),
        (["--interventions", "layer_copy", "--copy-routing", "1-2"], "is not A:B"),
        (["--interventions", "topk_change", "--topk-values", "5"], "--topk-values 5: must be in 1..4"),
        (["--interventions", "ablation"], "unknown ['ablation']"),
        (["--interventions", "random_routing", "--frozen-paths", "4"], "without the frozen_paths intervention"),
    ]
    for extra, message in cases:
        err = _cli_error(["analyze", "--checkpoint", ckpt, "--out", out, *extra], capsys)
        assert message in err and "fix:" in err, (extra, err)
    # A probe needs two labels: checked on the analysed tokens, still before any rank starts.
    data = runs["root"] / "one_label.txt"
    data.write_text("abc def " * 64)
    err = _cli_error(["analyze", "--checkpoint", ckpt, "--out", out, "--data", str(data), "--max-tokens", "256",
                      "--readouts", "probes", "--cache-dir", str(runs["root"] / "cache")], capsys)
    assert "probes need tokens of at least 2 labels, the data has 1" in err and "fix:" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary sibling left


def test_readouts_and_interventions_through_the_cli(runs, tmp_path) -> None:
    """`analyze --readouts all --interventions all` from the command line (the documented form), at EP=2 on two
    text files: every instrument that applies has its summary.json key and report section, nothing else is left."""
    import os
    import subprocess
    import sys

    from conftest import shared_cache

    for name, text in (("web.txt", "the quick brown fox jumps over the lazy dog. " * 60),
                       ("code.txt", "def f(x):\n    return x * 2 + 1\n" * 60)):
        (tmp_path / name).write_text(text)
    out = tmp_path / "R"
    env = dict(os.environ, MEGATRON_MOE_EXT_CACHE=shared_cache())
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_moe_ext", "analyze", "--checkpoint", str(runs["ckpt"]), "--data",
         str(tmp_path / "web.txt"), str(tmp_path / "code.txt"), "--readouts", "all", "--interventions", "all",
         "--nproc", "2", "--ep", "2", "--max-tokens", "2048", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    model = next(iter(summary["models"].values()))
    report = (out / "report.md").read_text()
    for name in (*NAMES, "logit_lens", "probes", "coactivation", "moefication"):
        assert name in model, f"summary.json lacks {name}"
        assert name in report, f"report.md lacks a section for {name}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R", "code.txt", "web.txt"]
