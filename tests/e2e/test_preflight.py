"""Everything Megatron would reject is rejected before any rank starts (issue #19 item 2, ``training/preflight.py``):
exit 2 with argparse's usage, the values and a fix, for ``train``, ``launch`` and ``--dry-run`` alike.

In-process through the launcher's main with ``--dry-run`` (``test_train.run_launcher``): nothing is started on these
paths. The data refusals replace a hang in Megatron's index builder, so they run under a timeout. One real run checks
that the embedded default fits a short run (``--train-iters 5``: its 10 warm-up iterations are shortened)."""

from __future__ import annotations

import os

import numpy
import pytest
from conftest import shared_cache
from test_train import run_launcher, train

# A model for --data-path runs, which drop the embedded default's model flags (except --micro-batch-size, per test).
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--seq-length", "32", "--max-position-embeddings", "32", "--num-experts", "4",
         "--expert-model-parallel-size", "2", "--global-batch-size", "4", "--train-iters", "5",
         "--lr", "1e-3", "--lr-warmup-iters", "0"]

REFUSALS = {
    "warmup_over_train_iters": (["--train-iters", "5", "--lr-warmup-iters", "10"],
                                "--lr-warmup-iters 10 must be less than the 5 iterations of the LR decay",
                                "fix: --lr-warmup-iters 4 or less, or --train-iters 11 or more"),
    "warmup_over_decay_iters": (["--lr-decay-iters", "8", "--lr-warmup-iters", "8"],
                                "(--lr-decay-iters 8;", "fix: --lr-warmup-iters 7 or less"),
    "global_batch": (["--global-batch-size", "12"],
                     "--global-batch-size 12 is not a multiple of --micro-batch-size 8 x data-parallel size 2",
                     "fix: --global-batch-size 16, or --micro-batch-size 6"),
    "seq_over_positions": (["--seq-length", "256"], "--seq-length 256 exceeds --max-position-embeddings 128",
                           "fix: --max-position-embeddings 256, or --seq-length 128"),
    "heads_tp": (["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "1", "--num-attention-heads",
                  "3", "--hidden-size", "66"],
                 "--num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2", "fix:"),
    "transformer_engine_on_cpu": (["--transformer-impl", "transformer_engine"],
                                  "--transformer-impl transformer_engine on CPU", "fix: --transformer-impl local"),
    "min_lr": (["--min-lr", "1.0"], "--min-lr 1.0 exceeds --lr 0.005", "fix: --min-lr 0.005 or less"),
    "lr_missing": (["--mock-data", *MODEL[:-4], "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer",
                    "--vocab-size", "257"], "--lr not given", "fix: e.g. --lr 1e-3"),
    "save_interval_missing": (["--mock-data", *MODEL, "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer",
                               "--vocab-size", "257", "--save", "ck"], "--save ck needs --save-interval",
                              "fix: e.g. --save-interval 5"),
    # Not one of ours: Megatron's validate_args, quoted.
    "megatron_validate_args": (["--context-parallel-size", "2", "--seq-length", "126", "--expert-model-parallel-size",
                                "1"], "Megatron's validate_args rejects these flags: seq-length should be a multiple of "
                                      "2 * context-parallel-size", "fix:"),
    # Not one of ours either: TransformerConfig.__post_init__ (in the ranks' model build), quoted.
    "megatron_transformer_config": (["--moe-router-topk", "1"], "Megatron's TransformerConfig rejects "
                                    "--moe-router-topk 1: Please use --moe-router-pre-softmax when topk is 1;",
                                    "fix: add --moe-router-pre-softmax"),
    "megatron_transformer_config_relu": (["--moe-router-type", "relu", "--moe-router-topk", "1"],
                                         "fix: add --moe-router-pre-softmax (the relu router does not read it"),
    "load_missing": (["--load", "no/such/dir"], "--load 'no/such/dir' does not exist",
                     "add --ext-allow-fresh-start to start from scratch"),
}


def assert_refused(code: int, err: str, *needles: str) -> None:
    assert code == 2, err[-3000:]
    assert "usage:" in err, err[-3000:]
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err[-3000:]}"


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_train_refuses_before_any_rank(tmp_path, case: str) -> None:
    args, *needles = REFUSALS[case]
    code, err = run_launcher(tmp_path, *args, "--dry-run")
    assert_refused(code, err, *needles)


def test_short_run_fits_the_default_warmup_in_dry_run(tmp_path) -> None:
    code, err = run_launcher(tmp_path, "--train-iters", "5", "--dry-run")
    assert code == 0, err[-3000:]


def test_load_without_a_checkpoint(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "iters" / "iter_0000003").mkdir(parents=True)
    code, err = run_launcher(tmp_path, "--load", "empty", "--dry-run")
    assert_refused(code, err, "--load 'empty' holds no checkpoint", "no iter_* directory", "--ext-allow-fresh-start")
    code, err = run_launcher(tmp_path, "--load", "iters", "--dry-run")
    assert_refused(code, err, "it has iter_0000003 but no latest_checkpointed_iteration.txt")
    code, err = run_launcher(tmp_path, "--load", "no/such/dir", "--ext-allow-fresh-start", "--dry-run")
    assert code == 0, err[-3000:]


def test_save_and_load_the_same_directory_is_the_auto_resume_idiom(tmp_path) -> None:
    """`--save D --load D` (cluster jobs that requeue themselves): a first start with nothing in D starts from
    scratch with one notice, not a refusal; a different --save keeps the refusal."""
    code, err = run_launcher(tmp_path, "--save", "ckpt", "--load", "ckpt", "--dry-run")
    assert code == 0, err[-3000:]
    assert "is also --save and holds no checkpoint yet: starting from scratch" in err
    code, err = run_launcher(tmp_path, "--save", "other", "--load", "ckpt2", "--dry-run")
    assert_refused(code, err, "--load 'ckpt2' does not exist")


# -- data -------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_tiny_text_file_is_refused_not_a_hang(tmp_path) -> None:
    (tmp_path / "tiny.txt").write_text("hello world\n")
    code, err = run_launcher(tmp_path, "--data-path", "tiny.txt", *MODEL, "--micro-batch-size", "1", "--dry-run")
    assert_refused(code, err, "has 1 document(s) (each raw text file is one)", "gives the validation split 0 of them",
                   "fix: --split 100,0,0 --eval-iters 0")


@pytest.mark.timeout(120)
def test_train_only_split_of_a_tiny_file_is_accepted_with_a_warning(tmp_path) -> None:
    (tmp_path / "tiny.txt").write_text("hello world\n")
    code, err = run_launcher(tmp_path, "--data-path", "tiny.txt", *MODEL, "--micro-batch-size", "1",
                             "--split", "100,0,0", "--eval-iters", "0", "--dry-run")
    assert code == 0, err[-3000:]
    assert "warning: the train split" in err and "has 13 tokens in 1 document(s), less than one sequence" in err, err


@pytest.mark.timeout(120)
def test_few_document_dataset_is_refused_not_a_hang(tmp_path) -> None:
    """10 documents with --split 98,1,1: validation gets round(0.99*10) - round(0.98*10) = 0 of them, and Megatron's
    GPTDataset would add 0 tokens per epoch forever (``_get_num_epochs``)."""
    from megatron_moe_ext.training import data as data_lib

    docs = [numpy.append(numpy.arange(40, dtype=numpy.uint16), data_lib.EOD_ID) for _ in range(10)]
    prefix = data_lib.write_indexed_dataset(docs, tmp_path / "ten")
    code, err = run_launcher(tmp_path, "--data-path", prefix, *MODEL, "--micro-batch-size", "1",
                             "--tokenizer-type", "NullTokenizer", "--vocab-size", "257", "--split", "98,1,1",
                             "--dry-run")
    assert_refused(code, err, "has 10 document(s)", "--split 98,1,1 gives the validation split 0 of them",
                   "(train 10, validation 0, test 0)")


def test_binary_file_passed_as_text_is_refused(tmp_path) -> None:
    (tmp_path / "weights.pt").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    code, err = run_launcher(tmp_path, "--data-path", "weights.pt", *MODEL, "--micro-batch-size", "1", "--dry-run")
    assert_refused(code, err, "data path", "weights.pt looks binary (a NUL byte at offset", "fix: pass a text file")


def test_missing_micro_batch_size_with_data_path(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("some text\n" * 50)
    code, err = run_launcher(tmp_path, "--data-path", "a.txt", *MODEL, "--dry-run")
    assert_refused(code, err, "--micro-batch-size not given", "only without --data-path/--mock-data",
                   "fix: add --micro-batch-size 8")


# -- launch -----------------------------------------------------------------------------------------
def run_launch(tmp_path, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from megatron_moe_ext import launch as launch_lib

    (tmp_path / "pretrain_gpt.py").write_text("raise SystemExit('a rank ran')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEGATRON_MOE_EXT_CACHE", shared_cache())
    try:
        code = launch_lib.main(["pretrain_gpt.py", *args, "--dry-run"])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_launch_refuses_the_same(tmp_path, monkeypatch, capsys) -> None:
    code, err = run_launch(tmp_path, monkeypatch, capsys, "--train-iters", "5", "--lr-warmup-iters", "10")
    assert_refused(code, err, *REFUSALS["warmup_over_train_iters"][1:])
    code, err = run_launch(tmp_path, monkeypatch, capsys, "--load", "no/such/dir")
    assert_refused(code, err, "--load 'no/such/dir' does not exist")
    code, err = run_launch(tmp_path, monkeypatch, capsys, "--load", "no/such/dir", "--ext-allow-fresh-start")
    assert code == 0, err[-3000:]


def test_launch_short_run_fits_the_default_warmup(tmp_path, monkeypatch, capsys) -> None:
    code, err = run_launch(tmp_path, monkeypatch, capsys, "--train-iters", "5")
    assert code == 0, err[-3000:]


# -- one real run -----------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_short_run_on_the_embedded_default_completes(tmp_path) -> None:
    """`train --train-iters 5`: the default's 10 warm-up iterations would trip Megatron's scheduler assert."""
    proc = train(tmp_path, "--train-iters", "5", "--save", "ckpt")
    assert "iteration        5/       5" in proc.stdout, proc.stdout[-3000:]
    assert os.path.isdir(tmp_path / "ckpt")
