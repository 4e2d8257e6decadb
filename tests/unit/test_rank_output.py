"""Local ranks' output: whole lines, each prefixed with its rank, for Python prints and C-level writes alike."""

from __future__ import annotations

import os


def _say(argv: list[str]) -> None:
    import sys

    rank = os.environ["RANK"]
    # sys.__stdout__: descriptor 1, as sys.stdout is in a real run (under pytest sys.stdout is its capture file)
    print(f"python line {rank}", file=sys.__stdout__, flush=True)
    os.write(2, f"c-level {rank} part one ".encode())  # one line written in two pieces
    os.write(2, b"and two\nno newline at the end")


def test_every_line_of_every_rank_is_whole_and_prefixed(capfd) -> None:
    from megatron_moe_ext.runtime.local_ranks import start_local_ranks

    assert start_local_ranks(_say, [], 2, threads_per_rank=1) == 0
    out, err = capfd.readouterr()
    assert sorted(line for line in out.splitlines() if "python line" in line) == [
        "[rank0] python line 0", "[rank1] python line 1"]
    ours = sorted(line for line in err.splitlines() if "c-level" in line or "no newline" in line)
    assert ours == ["[rank0] c-level 0 part one and two", "[rank0] no newline at the end",
                    "[rank1] c-level 1 part one and two", "[rank1] no newline at the end"]


def test_a_single_rank_is_not_prefixed(capfd) -> None:
    from megatron_moe_ext.runtime.local_ranks import start_local_ranks

    assert start_local_ranks(_say, [], 1, threads_per_rank=1) == 0
    out, _ = capfd.readouterr()
    assert "python line 0" in out and "[rank" not in out
