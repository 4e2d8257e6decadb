"""What our experts cannot honour is refused before any rank starts (``settings/experts.py``), through
the launchers' flag path: ``megatron-moe-ext train`` and ``megatron-moe-ext launch`` exit 2 with
argparse's usage and the reason; expert biases (Megatron's default) pass.

In-process, as in test_train.py / test_launch.py: no rank is started on these paths."""

from __future__ import annotations

import pytest
from conftest import shared_cache
from test_train import run_launcher

REFUSALS = {
    "expert_tp": (["--expert-tensor-parallel-size", "2", "--expert-model-parallel-size", "1"],
                  "--expert-tensor-parallel-size 2 with --moe-expert-backend grouped (our FineGrainedExperts)"),
    "latent": (["--moe-latent-size", "16"], "--moe-latent-size 16 with --moe-expert-backend grouped"),
    "glu_interleave": (["--moe-mlp-glu-interleave-size", "8"], "--moe-mlp-glu-interleave-size 8 with"),
    "te_activation": (["--use-te-activation-func"], "--use-te-activation-func with --moe-expert-backend grouped"),
    "fp8_not_te": (["--fp8-format", "e4m3"], "--fp8-format e4m3 with --moe-expert-backend grouped"),
    "fp8_recipe_te": (["--moe-expert-backend", "te", "--fp8-format", "e4m3", "--fp8-recipe", "blockwise"],
                      "--fp8-recipe blockwise with --moe-expert-backend te"),
    "fp4": (["--fp4-format", "e2m1"], "--fp4-format e2m1 with --moe-expert-backend grouped"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_train_refuses_what_our_experts_cannot_honour(tmp_path, case: str) -> None:
    args, message = REFUSALS[case]
    code, err = run_launcher(tmp_path, *args, "--dry-run")
    assert code == 2, err[-3000:]
    assert "usage:" in err and message in err and "fix:" in err, err[-3000:]


# Megatron's default add_bias_linear=True (no --disable-bias-linear: --mock-data skips our embedded
# default model) with the issue's --moe-granularity 2 --moe-expansion-rate 2.
BIASED_MODEL = ["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256",
                "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings", "32",
                "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--moe-granularity", "2",
                "--moe-expansion-rate", "2", "--micro-batch-size", "1", "--train-iters", "5", "--lr", "1e-3"]


def test_train_accepts_expert_biases(tmp_path) -> None:
    code, err = run_launcher(tmp_path, *BIASED_MODEL, "--dry-run")
    assert code == 0, err[-3000:]


def test_train_accepts_upcycling_with_expert_biases(tmp_path) -> None:
    """Upcycling converts the dense biases too (``integration/upcycling.py``): no refusal."""
    code, err = run_launcher(tmp_path, *BIASED_MODEL, "--moe-use-upcycling", "--save", "upcycled",
                             "--save-interval", "5", "--dry-run")
    assert code == 0, err[-3000:]


def test_launch_refuses_expert_tensor_parallelism_before_any_rank(tmp_path, monkeypatch, capsys) -> None:
    from megatron_moe_ext import launch as launch_lib

    # The script would fail if a rank ran it; the refusal comes first (and --dry-run starts none anyway).
    (tmp_path / "pretrain_gpt.py").write_text("raise SystemExit('a rank ran')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEGATRON_MOE_EXT_CACHE", shared_cache())
    args, message = REFUSALS["expert_tp"]
    with pytest.raises(SystemExit) as exit_info:
        launch_lib.main(["pretrain_gpt.py", *args, "--dry-run"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    assert "usage:" in err and message in err, err[-3000:]


@pytest.mark.parametrize("case", ["expert_tp", "fp8_not_te"])
def test_patched_script_refuses_at_argument_parsing(case: str, monkeypatch, capsys) -> None:
    """The patched pretrain_gpt.py has no launcher of ours: its ranks parse with
    ``megatron_moe_ext.launch.parse_and_validate_args``, which refuses (exit 2, usage, the fix) before Megatron's
    validation, process groups or any model (in-process here: nothing but parsing runs)."""
    import sys

    from megatron_moe_ext import launch as launch_lib
    from megatron_moe_ext.runtime.rank import CPU_ARGS

    args, message = REFUSALS[case]
    model = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
             "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "1",
             "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--num-experts", "4"]
    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *CPU_ARGS, *model, *args])
    with pytest.raises(SystemExit) as exit_info:
        launch_lib.parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    assert "usage:" in err and message in err and "fix:" in err, err[-3000:]
