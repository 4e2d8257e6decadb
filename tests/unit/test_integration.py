"""The integration table: the canary against the installed megatron-core, the start-up refusal, installing, and
that nothing outside ``integration/installer.py`` assigns to a Megatron attribute."""

from __future__ import annotations

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest

from megatron_moe_ext.integration import installer as install_mod
from megatron_moe_ext.integration.table import GROUPS, REPLACEMENTS, SEAMS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_moe_ext"


def test_canary_every_row_and_seam_fits_the_installed_megatron_core() -> None:
    """Fails, naming the row, when megatron-core moves or changes a function we replace or a seam we use."""
    assert install_mod.check() == []


@pytest.mark.parametrize("row", REPLACEMENTS, ids=lambda r: r.name)
def test_rows_are_complete_and_their_wrappers_import(row) -> None:
    assert row.group in GROUPS
    assert row.reason and row.seam and row.checked
    module_name, _, function = row.wrapper.partition(":")
    assert callable(getattr(importlib.import_module(module_name), function))
    assert len({r.name for r in REPLACEMENTS}) == len(REPLACEMENTS)
    assert len({r.target for r in REPLACEMENTS}) == len(REPLACEMENTS)


def test_canary_names_the_row_of_a_changed_target() -> None:
    """A row that relies on a parameter the target does not have (as after an upstream rename) is reported by
    name; a target that is gone too. Negative controls for the canary above."""
    row = next(r for r in REPLACEMENTS if r.name == "peer-optimizer-groups")
    renamed = dataclasses.replace(row, params=("args", "model_args"))
    gone = dataclasses.replace(row, name="gone-row", target="megatron.training.training:no_such_function")
    problems = install_mod.check(table=[renamed, gone], seams=False)
    assert len(problems) == 2
    assert "'peer-optimizer-groups'" in problems[0] and "model_args" in problems[0]
    assert "'gone-row'" in problems[1] and "does not exist" in problems[1]


def test_start_up_refuses_a_megatron_that_changed_under_a_row(monkeypatch) -> None:
    """install() checks before it replaces anything: a target whose signature changed is one IntegrationError
    naming the row, and nothing is installed."""
    import megatron.training.training as training

    def get_megatron_optimizer_config(config_container):  # an upstream signature change
        raise AssertionError("must not be called")

    monkeypatch.setattr(training, "get_megatron_optimizer_config", get_megatron_optimizer_config)
    with pytest.raises(install_mod.IntegrationError, match="'peer-optimizer-groups'.*no longer takes args"):
        install_mod.install(("training",))
    assert training.get_megatron_optimizer_config is get_megatron_optimizer_config
    assert "upcycling" not in install_mod.installed()


def _install_everything() -> dict:
    """On a rank (CPU runtime on: the cpu group is in place), install the other groups twice."""
    from megatron_moe_ext.integration import install, installed, original
    from megatron_moe_ext.runtime.rank import setup_rank

    before = installed()
    setup_rank("launch")
    setup_rank("launch")
    first = install(("training", "script"))  # everything is in place already: nothing is applied again
    import megatron.training.training as training

    return {"before": before, "after": installed(), "again": first,
            "original_is_megatron": original("peer-optimizer-groups").__module__ == "megatron.training.training",
            "wrapped": training.get_megatron_optimizer_config.__module__}


def test_every_entry_installs_its_rows_once(distributed) -> None:
    result = distributed(_install_everything, world_size=1)[0]
    # The CPU runtime installs the cpu group itself; a test rank (testing/distributed.py) the model group too.
    first_rows = {r.name for r in REPLACEMENTS if r.group in ("cpu", "model")}
    assert set(result["before"]) == first_rows
    # Every row is in place, telemetry's too: its progress line needs no NVML (only its GPU line does).
    assert set(result["after"]) == {r.name for r in REPLACEMENTS}
    assert result["again"] == []
    assert result["original_is_megatron"] and result["wrapped"] == "megatron_moe_ext.integration.optimizer_groups"


def _megatron_names(tree: ast.Module) -> set[str]:
    """Names bound to megatron modules or their attributes by this module's imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("megatron.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron."):
            names |= {a.asname or a.name for a in node.names}
    return names


def test_nothing_outside_the_install_function_assigns_to_megatron() -> None:
    """Every replacement of a Megatron attribute goes through the table: no `megatron_thing.attr = ...` (or
    setattr on one) in shipped code."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("megatron_moe_ext/testing/"):
            continue
        tree = ast.parse(path.read_text())
        megatron = _megatron_names(tree)
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                root = target
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(target, ast.Attribute) and isinstance(root, ast.Name) and root.id in megatron:
                    offenders.append(f"{rel}:{node.lineno}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                    and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in megatron):
                offenders.append(f"{rel}:{node.lineno} (setattr)")
    assert offenders == []


def test_docs_integration_page_shows_the_table_as_it_is() -> None:
    page = (ROOT / "docs" / "integration.md").read_text()
    assert install_mod.markdown_table() in page, "regenerate the table with megatron_moe_ext.integration.installer.markdown_table()"
    assert len(SEAMS) >= 5


def test_missing_dataset_helpers_are_one_error_naming_the_build_command(monkeypatch) -> None:
    """Row cpu-compile-helpers: the wheel's prebuilt helpers pass; a source checkout without them is told how to
    build them (instead of a ModuleNotFoundError deep in dataset building)."""
    import importlib.util

    from megatron_moe_ext.integration.cpu import wrap_compile_helpers

    compile_helpers = wrap_compile_helpers(lambda: None)
    compile_helpers()  # the installed wheel has helpers_cpp
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith("helpers_cpp") else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match=r"helpers_cpp is not built in .*fix: pip install pybind11 && make -C "):
        compile_helpers()
