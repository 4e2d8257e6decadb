"""Every `megatron-moe-ext` command in the README and docs/ works as written.

Commands are extracted from fenced shell blocks (continuation lines joined, trailing comments dropped) and from
inline code in the README, so a new or edited command is checked without touching this file:
- `train` and `launch` commands run with `--dry-run` (the launcher's complete validation: our flags and settings,
  Megatron's own argument checks, data, layout; everything a real start checks before the first rank), in-process;
- `flops` runs as written;
- the demo's follow-ups (`analyze`, `export-hf`, `import-hf`, training from the import) run for real on a tiny
  checkpoint at the demo's path, in a scratch working directory;
- `Megatron-LM/pretrain_gpt.py` is the stand-in script of test_launch.py.
Commands that are templates (placeholders such as `...`, `CKPT`, `[--tp 2]`) must be declared in TEMPLATES with
the test that covers their concrete form, so the docs cannot grow an unchecked command.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from conftest import shared_cache

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Template command (as it stands in the docs) -> where its concrete form is tested.
TEMPLATES = {
    "megatron-moe-ext analyze --checkpoint CKPT --data web.txt code.txt --max-tokens 65536 --hidden --out R":
        "tests/e2e/test_analysis.py (analyze with --data files, --hidden)",
    "megatron-moe-ext compare --checkpoint runs/G1 --checkpoint runs/G16 --checkpoint runs/dense --out R2":
        "tests/e2e/test_analysis.py (the granularity sweep's compare)",
    "megatron-moe-ext analyze --trace R/traces/CKPT --out R3": "tests/e2e/test_analysis.py (report from traces)",
    "megatron-moe-ext train ... --moe-granularity G --moe-expansion-rate E --moe-use-upcycling --load DENSE --save NEW":
        "tests/e2e/test_train.py::test_upcycling_from_a_dense_checkpoint",
    "megatron-moe-ext export-hf --checkpoint runs/demo/checkpoints --out runs/demo/hf [--iteration N] [--dtype bf16|fp32]":
        "run below without the optional brackets",
    "megatron-moe-ext import-hf --hf runs/demo/hf --out runs/demo/imported [--tp 2]": "run below with --tp 2",
    "megatron-moe-ext train --data-path 0.7 /data/web_text_document 0.3 notes.txt ...":
        "tests/e2e/test_train.py (weighted prefixes and raw text files)",
    "megatron-moe-ext train --save ckpt --load ckpt ...": "tests/e2e/test_train.py::test_resume_reproduces_uninterrupted_run",
    "megatron-moe-ext launch Megatron-LM/pretrain_gpt.py --nproc 8 --data-path /data/web_text_document ...":
        "a GPU recipe (8 ranks); the launch path is tested by tests/e2e/test_launch.py",
    "megatron-moe-ext train $(cat runs/demo/imported/megatron_flags.txt) --load runs/demo/imported --save runs/demo/continued":
        "run below with the flags file read",
    # docs/interpretability.md (issue #23)
    "megatron-moe-ext analyze --checkpoint CKPT --interventions all --out R":
        "tests/e2e/test_interventions.py (every intervention through capture) and test_compare_sweep.py (the CLI)",
    "megatron-moe-ext analyze --checkpoint CKPT --data web.txt code.txt --interventions expert_ablation,frozen_paths "
    "--ablate-experts 1:0,1:3 --ablate-top-m 2 --renormalize --frozen-paths 1,4,16,all --out R":
        "tests/e2e/test_interventions.py (these options on the known-answer model)",
    "megatron-moe-ext compare --sweep runs/sweep --interventions all --out R2": "tests/e2e/test_compare_sweep.py",
    "megatron-moe-ext analyze --checkpoint CKPT --readouts all --out R":
        "tests/e2e/test_interventions.py::test_readouts_and_interventions_through_the_cli",
    "megatron-moe-ext analyze --checkpoint CKPT --readouts logit_lens,probes --nproc 2 --tp 2 --out R":
        "tests/distributed/test_readouts_tp.py (TP=2+SP against one rank)",
    "megatron-moe-ext analyze --checkpoint CKPT --readouts probes --probe-max-tokens 20000 --probe-c 0.1 --out R":
        "tests/distributed/test_readouts_parallel.py (the probe options)",
    "megatron-moe-ext dynamics --run runs/dyn/checkpoints --out runs/dyn/dynamics --nproc 2 --ep 2":
        "tests/e2e/test_dynamics_cli.py (a run with three routing checkpoints)",
    "megatron-moe-ext analyze --checkpoint runs/demo/checkpoints --readouts all --interventions all --nproc 2 --ep 2 "
    "--out R": "tests/e2e/test_interventions.py::test_readouts_and_interventions_through_the_cli (the same flags)",
    "megatron-moe-ext analyze --checkpoint runs/demo/checkpoints --readouts moefication --out runs/demo/moefication":
        "tests/e2e/test_moefication_capture.py (analyze --readouts moefication at EP=2 and EP=1)",
}


def _commands() -> list[tuple[str, str]]:
    """(file, command) for every megatron-moe-ext command in the docs, in order."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                line = re.sub(r"\s+", " ", line)
                if line.startswith("megatron-moe-ext "):
                    found.append((path.name, line))
        if path.name == "README.md":
            found += [(path.name, c) for c in re.findall(r"`(megatron-moe-ext [^`]+)`", text) if "SUBCOMMAND" not in c]
    return found


COMMANDS = _commands()
RUNNABLE = [(f, c) for f, c in COMMANDS if c not in TEMPLATES]

# Scaling-lab commands that train a whole sweep or read its results (runs/sweep/...): their concrete forms run in
# the named tests; every other `sweep`/`fit`/`plan` command in the docs runs as written below.
LAB_COVERED_ELSEWHERE = {
    "megatron-moe-ext sweep run runs/sweep": "tests/e2e/test_sweep.py::test_grid_plan_run_collect (and the resume test)",
    "megatron-moe-ext sweep collect runs/sweep": "tests/e2e/test_sweep.py::test_grid_plan_run_collect",
    "megatron-moe-ext sweep run runs/study": "the 95-minute study of docs/sweeps.md; the same command at tiny size: "
                                             "tests/e2e/test_sweep.py::test_grid_plan_run_collect",
    "megatron-moe-ext sweep collect runs/study": "tests/e2e/test_sweep.py::test_grid_plan_run_collect",
    "megatron-moe-ext fit runs/study/results.csv --law krajewski2024 --json runs/study/law.json --plot runs/study/fit.png":
        "tests/e2e/test_fit_plan_cli.py",
    "megatron-moe-ext fit runs/sweep/results.csv --law krajewski2024 --json runs/sweep/law.json --plot runs/sweep/fit.png":
        "tests/e2e/test_fit_plan_cli.py",
    "megatron-moe-ext plan --flops 1e20 --law-json runs/sweep/law.json --expansion-rates 8": "tests/e2e/test_fit_plan_cli.py",
    "megatron-moe-ext fit runs/sweep/results.csv --law joint2025 --json runs/sweep/joint.json":
        "tests/e2e/test_fit_plan_cli.py",
    "megatron-moe-ext plan --flops 1e20 --law-json runs/sweep/joint.json --memory 8e10": "tests/e2e/test_fit_plan_cli.py",
}
LAB = ("sweep", "fit", "plan")


def test_every_template_is_declared_and_still_documented() -> None:
    documented = {c for _, c in COMMANDS}
    placeholder = re.compile(r"\.\.\.|\[--|\$\(|\b(CKPT|DENSE|NEW|R\d?|G|E)\b(?!-)")
    undeclared = [c for c in documented if placeholder.search(c.replace("megatron-moe-ext", "")) and c not in TEMPLATES]
    assert undeclared == [], "declare these templates (and where their concrete form is tested) in TEMPLATES"
    assert set(TEMPLATES) <= documented, f"stale TEMPLATES entries: {set(TEMPLATES) - documented}"
    assert len(RUNNABLE) >= 10


def _stand_in(tmp: Path) -> None:
    from test_launch import STAND_IN

    (tmp / "Megatron-LM").mkdir(exist_ok=True)
    (tmp / "Megatron-LM" / "pretrain_gpt.py").write_text(STAND_IN)


@pytest.mark.parametrize("doc, command", [(f, c) for f, c in RUNNABLE if c.split()[1] in ("train", "launch")],
                         ids=lambda v: v if v.endswith(".md") else v.split()[1])
def test_train_and_launch_commands_pass_the_complete_validation(doc, command, tmp_path, monkeypatch, capsys) -> None:
    from megatron_moe_ext import cli

    _stand_in(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEGATRON_MOE_EXT_CACHE", shared_cache())
    try:
        code = cli.main([*shlex.split(command)[1:], "--dry-run"])
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 0, f"{doc}: `{command}` fails as written:\n{err[-3000:]}"


@pytest.mark.parametrize("doc, command", [(f, c) for f, c in RUNNABLE if c.split()[1] == "flops"],
                         ids=lambda v: v if v.endswith(".md") else "flops")
def test_flops_commands_run(doc, command, capsys) -> None:
    from megatron_moe_ext import cli

    try:
        code = cli.main(shlex.split(command)[1:])
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    assert code == 0, f"{doc}: `{command}`:\n{err[-3000:]}"
    assert "total" in out


def test_flops_without_shape_flags_is_the_model_train_trains() -> None:
    """The fine-grained page's pair: `train --moe-granularity 8 ...` and `flops` with the same flags describe the
    same model (the embedded default with the user's flags on top)."""
    from megatron_moe_ext.accounting import account, shape_from_args
    from megatron_moe_ext.accounting_cli import with_embedded_default
    from megatron_moe_ext.args import parse_megatron_args
    from megatron_moe_ext.training.train import prepare_argv

    user = ["--moe-granularity", "8", "--moe-expansion-rate", "4", "--moe-base-topk", "1"]
    trained = prepare_argv(user, cache_dir=shared_cache(), cpu=True)
    costed = with_embedded_default(user)
    a = account(shape_from_args(parse_megatron_args(trained, validate=False)))
    b = account(shape_from_args(parse_megatron_args(costed, validate=False)))
    assert a.to_dict() == b.to_dict()
    assert a.to_dict()["num_experts"] == 32


def test_demo_follow_up_commands_run_as_written(tmp_path, monkeypatch) -> None:
    """analyze / export-hf / import-hf (+ training from the import) at the demo's paths, on a tiny checkpoint."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    env = dict(os.environ, MEGATRON_MOE_EXT_CACHE=shared_cache())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "megatron_moe_ext", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{shlex.join(args)}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        return proc.stdout

    # The demo's checkpoint, tiny: the embedded default model for 2 iterations at runs/demo/checkpoints.
    run("train", "--train-iters", "2", "--lr-warmup-iters", "1", "--eval-iters", "1", "--save-interval", "2")
    followups = {
        "megatron-moe-ext analyze --checkpoint runs/demo/checkpoints --out runs/demo/analysis": [],
        "megatron-moe-ext export-hf --checkpoint runs/demo/checkpoints --out runs/demo/hf": [],
        "megatron-moe-ext import-hf --hf runs/demo/hf --out runs/demo/imported": ["--tp", "2"],
    }
    documented = {c for _, c in COMMANDS}
    for command, extra in followups.items():
        template = next(t for t in TEMPLATES if t.startswith(command)) if command not in documented else command
        assert template in documented, f"`{command}` is no longer documented"
        run(*shlex.split(command)[1:], *extra)
    assert (tmp_path / "runs/demo/analysis/report.md").is_file()
    flags = shlex.split((tmp_path / "runs/demo/imported/megatron_flags.txt").read_text())
    run("train", *flags, "--load", "runs/demo/imported", "--save", "runs/demo/continued", "--dry-run")


def test_lab_commands_are_documented_as_declared() -> None:
    documented = {c for _, c in COMMANDS}
    assert set(LAB_COVERED_ELSEWHERE) <= documented, f"stale entries: {set(LAB_COVERED_ELSEWHERE) - documented}"


@pytest.mark.parametrize("doc, command", [(f, c) for f, c in RUNNABLE
                                          if c.split()[1] in LAB and c not in LAB_COVERED_ELSEWHERE],
                         ids=lambda v: v if v.endswith(".md") else " ".join(v.split()[1:3]))
def test_lab_commands_run_as_written(doc, command, tmp_path, monkeypatch, capsys) -> None:
    """`sweep plan` (writes the grid, never trains) and `plan` from a preset run as documented, in a scratch dir."""
    from megatron_moe_ext import cli

    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(shlex.split(command)[1:])
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    assert code == 0, f"{doc}: `{command}` fails as written:\n{err[-3000:]}"
    words = shlex.split(command)
    if words[1:3] == ["sweep", "plan"]:
        assert (tmp_path / words[words.index("--out") + 1] / "runs.csv").is_file()
