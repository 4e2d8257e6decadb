"""`train --help` / `launch --help` list our flags by feature; known-harmless CPU messages are silenced by exact
message and origin only."""

from __future__ import annotations

import logging
import re
import warnings

import pytest

from megatron_moe_ext import cli
from megatron_moe_ext.args import ext_field_names
from megatron_moe_ext.integration import flag_help
from megatron_moe_ext.runtime import cpu


@pytest.mark.parametrize("entry", ["train", "launch"])
def test_help_lists_our_flags_grouped_by_feature(entry, capsys) -> None:
    with warnings.catch_warnings(), pytest.raises(SystemExit) as done:  # main() adds the CPU filters: dropped after
        cli.main([entry, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--nproc" in text and "--dry-run" in text  # the launcher's own options stay
    titles = [f"megatron-moe-ext: {title}:" for title in flag_help.FEATURE_GROUPS]
    positions = [text.index(t) for t in titles]
    assert positions == sorted(positions)
    for field in ext_field_names():  # every flag, under its feature's heading
        flag = "--" + field.replace("_", "-")
        where = re.search(rf"^  {re.escape(flag)}\b", text, flags=re.M)
        assert where is not None, flag
        heading = max((p, t) for p, t in zip(positions, titles) if p < where.start())[1]
        assert heading == f"megatron-moe-ext: {flag_help.feature_of(field)}:", (flag, heading)
    assert "Every Megatron-LM flag" in " ".join(text.split())


def test_every_field_is_in_exactly_one_feature_group() -> None:
    for field in ext_field_names():
        owners = [t for t, names in flag_help.FEATURE_GROUPS.items()
                  if any(field == n or (n.endswith("_") and field.startswith(n)) for n in names)]
        assert len(owners) == 1, (field, owners)


def test_help_does_not_swallow_megatron_flags() -> None:
    from megatron_moe_ext.training.train import _launcher_parser

    ours, rest = _launcher_parser().parse_known_args(["--nproc", "2", "--moe-granularity", "2", "--hidden-size", "8"])
    assert ours.nproc == 2 and rest == ["--moe-granularity", "2", "--hidden-size", "8"]


def _warn(message: str, module: str) -> list[str]:
    """What a warning from ``module`` shows with the filters on (inside catch_warnings, which drops them after)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu.filter_harmless_cpu_messages()
        warnings.warn_explicit(message, UserWarning, filename=f"{module}.py", lineno=1, module=module)
    return [str(w.message) for w in caught]


def test_harmless_warnings_are_silenced_by_message_and_origin_only() -> None:
    assert _warn("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends") == []
    assert _warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
                 "megatron.core.optimizer") == []
    # The same message from our own code, and another message from the same module, still show.
    assert _warn("Apex is not installed. Falling back to Torch Norm", "megatron_moe_ext.layers.norms") != []
    assert _warn("something new and important", "megatron.core.models.backends") != []


def test_every_harmless_message_says_why() -> None:
    for kind, origin, pattern, why in cpu.HARMLESS_CPU_MESSAGES:
        assert kind in ("warning", "log") and origin and pattern and len(why) > 20, (origin, pattern)
        re.compile(pattern)


def test_harmless_log_records_are_filtered_on_their_logger_only() -> None:
    cpu.filter_harmless_cpu_messages()
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "GPTModel IS DEPRECATED. use X", (), None)
    assert not logger.filter(record)
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 1, "a real problem", (), None)
    assert logger.filter(other)
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    assert not torch_logger.filter(torch_logger.makeRecord(
        torch_logger.name, logging.WARNING, __file__, 1, "No CUDA runtime is found, using CUDA_HOME='/usr/local'",
        (), None))


def test_args_dump_goes_to_a_file_with_megatrons_text(tmp_path, capsys, monkeypatch) -> None:
    import argparse

    from megatron.training import arguments

    from megatron_moe_ext.integration import args_dump
    from megatron_moe_ext.integration.installer import original

    megatron_print = original("args-dump") if "args-dump" in _installed() else arguments._print_args
    args = argparse.Namespace(save=str(tmp_path / "ckpt"), hidden_size=64, num_layers=2, lr=None)
    capsys.readouterr()
    megatron_print("arguments", args)  # Megatron's own dump (rank 0: no process group here)
    megatron_text = capsys.readouterr().out
    printed: list[str] = []
    path = args_dump.dump_args("arguments", args, print_fn=printed.append)
    assert open(path).read() == megatron_text
    assert printed == [f"> arguments: 4 values written to {path} (MEGATRON_MOE_EXT_PRINT_ARGS=1 prints them here)"]
    printed.clear()
    assert args_dump.dump_args("arguments", argparse.Namespace(save=None), print_fn=printed.append) is None
    assert "pass --save" in printed[0]
    wrapped = args_dump.wrap_print_args(megatron_print)
    monkeypatch.setenv(args_dump.PRINT_ENV, "1")
    wrapped("arguments", args)
    assert capsys.readouterr().out == megatron_text


def _installed() -> list[str]:
    from megatron_moe_ext.integration import installed

    return installed()
