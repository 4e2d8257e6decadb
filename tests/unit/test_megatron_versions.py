"""The supported megatron-core range: which versions the check accepts, what it says when it refuses, that it
reads the megatron.core that Python actually imports (a source checkout on PYTHONPATH), that setup.cfg states the
same range, and that our generated flags collide with nothing of the installed Megatron's
(docs/megatron-versions.md)."""

from __future__ import annotations

import configparser
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_moe_ext import _compat
from megatron_moe_ext._compat import MEGATRON_CORE_RANGE, check_megatron_core_version

ROOT = Path(__file__).resolve().parents[2]

ACCEPTED = [
    "0.19.2",
    "0.19.2+de4d74c",  # a local label: package_info appends the git commit of the checkout it sits in
    "0.19.3",
    "0.20.0",  # Megatron-LM main's package_info (checked by hand, docs/megatron-versions.md)
    "0.20.0rc0",
    "0.20.0.dev0",
    "0.20.0rc1+abc1234",
    "0.20.7",
]
REFUSED_BELOW = ["0.18.0", "0.19.0", "0.19.1", "0.19.2rc1", "0.19.2.dev0"]
REFUSED_ABOVE = ["0.21.0", "0.21.0rc0", "0.21.0.dev0", "1.0.0"]


@pytest.mark.parametrize("version", ACCEPTED)
def test_in_range_versions_are_accepted(version: str) -> None:
    assert check_megatron_core_version(version) == version


@pytest.mark.parametrize("version", REFUSED_BELOW + REFUSED_ABOVE)
def test_out_of_range_versions_are_refused_with_location_range_and_fix(version: str) -> None:
    with pytest.raises(ValueError) as err:
        check_megatron_core_version(version)
    message = str(err.value)
    assert message.startswith(f"megatron-core {version} is not supported")
    assert _compat.megatron_core_location() in message
    assert ">=0.19.2,<0.21" in message
    assert 'pip install "megatron-moe-ext[megatron]"' in message and "PYTHONPATH" in message


def test_the_installed_megatron_core_is_in_range() -> None:
    found = check_megatron_core_version()
    import megatron.core

    assert _compat.megatron_core_location() == megatron.core.__file__
    assert found.startswith(megatron.core.package_info.__shortversion__)


def test_not_importable_names_the_install_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules is Python's "this import fails"; the tests' own import of megatron.core is restored.
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    monkeypatch.delitem(sys.modules, "megatron.core.package_info", raising=False)
    with pytest.raises(ImportError, match=r'megatron\.core is not importable.*pip install "megatron-moe-ext\[megatron\]"'
                       r".*PYTHONPATH"):
        check_megatron_core_version()
    with pytest.raises(ValueError, match="nowhere: megatron.core is not importable"):
        check_megatron_core_version("0.18.0")


def _fake_checkout(root: Path, minor: int, pre_release: str) -> None:
    """A Megatron-LM source tree as far as the check reads it: megatron/core with package_info.py, no metadata."""
    core = root / "megatron" / "core"
    core.mkdir(parents=True)
    (core / "__init__.py").write_text("")
    (core / "package_info.py").write_text(textwrap.dedent(f"""\
        MAJOR = 0
        MINOR = {minor}
        PATCH = 0
        PRE_RELEASE = {pre_release!r}
        VERSION = (MAJOR, MINOR, PATCH, PRE_RELEASE)
        __shortversion__ = '.'.join(map(str, VERSION[:3]))
        __version__ = '.'.join(map(str, VERSION[:3])) + ''.join(VERSION[3:])
        """))


def _check_in_subprocess(pythonpath: Path) -> str:
    code = (
        "from megatron_moe_ext._compat import check_megatron_core_version\n"
        "try:\n    print('ok', check_megatron_core_version())\n"
        "except ValueError as err:\n    print('ValueError', err)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


def test_a_checkout_on_pythonpath_is_the_one_checked(tmp_path: Path) -> None:
    """The wheel installed in this venv (in range) must not hide an out-of-range checkout that shadows it."""
    _fake_checkout(tmp_path / "rc", 20, "rc0")
    assert _check_in_subprocess(tmp_path / "rc") == "ok 0.20.0rc0"
    _fake_checkout(tmp_path / "new", 21, "")
    out = _check_in_subprocess(tmp_path / "new")
    assert out.startswith("ValueError megatron-core 0.21.0 is not supported"), out
    assert str(tmp_path / "new" / "megatron" / "core" / "__init__.py") in out


def test_setup_cfg_states_the_same_range_and_does_not_require_megatron() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")

    def requirements(section: str, key: str) -> list[str]:
        lines = (line.split("#")[0].strip() for line in cfg[section][key].splitlines())
        return [line for line in lines if line]

    assert not [r for r in requirements("options", "install_requires") if r.startswith("megatron-core")]
    extras = cfg["options.extras_require"]
    for extra in ("megatron", "test"):
        pins = [r for r in requirements("options.extras_require", extra) if r.startswith("megatron-core")]
        assert pins == [f"megatron-core{MEGATRON_CORE_RANGE}"], (extra, pins, extras[extra])


def test_our_flags_and_fields_collide_with_nothing_of_the_installed_megatron() -> None:
    """New TransformerConfig fields become Megatron flags through its ArgumentGroupFactory: one named like ours
    would silently take our field's place (and drop our flag), so names, flags and argparse dests are checked
    against the megatron.core actually imported."""
    import argparse
    import warnings

    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.training.arguments import add_megatron_arguments

    from megatron_moe_ext.args import GROUP_TITLE, add_ext_args
    from megatron_moe_ext.config import MoEExtConfig

    base = {f.name for f in dataclasses.fields(TransformerConfig)}
    ours = set(vars(MoEExtConfig)["__annotations__"])  # the fields MoEExtConfig's own body declares
    assert not ours & base, f"Megatron's TransformerConfig now has fields named like ours: {sorted(ours & base)}"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    megatron_dests = {a.dest for a in parser._actions}
    megatron_flags = {s for a in parser._actions for s in a.option_strings}
    add_ext_args(parser)  # argparse itself raises on a conflicting option string
    group = next(g for g in parser._action_groups if g.title == GROUP_TITLE)
    assert not {a.dest for a in group._group_actions} & megatron_dests
    assert not {s for a in group._group_actions for s in a.option_strings} & megatron_flags
    assert {a.dest for a in group._group_actions} == ours


def test_routers_take_what_newer_megatron_passes() -> None:
    """Megatron-LM dev builds routers with ``layer_number=`` and calls them as ``router(hidden, padding_mask,
    input_ids, packed_seq_params)``; TopKRouter.routing gets ``input_ids=``/``packed_seq_params=``. Our routers
    pass constructor and routing keywords on to TopKRouter and the product-key forward ignores the extras
    (docs/megatron-versions.md, the dev section)."""
    import inspect

    from megatron_moe_ext.layers.balanced_router import BalancedNoisyTopKRouter, BalancedTopKRouter
    from megatron_moe_ext.layers.noisy_gating import NoisyTopKRouter
    from megatron_moe_ext.layers.product_key_router import ProductKeyRouter

    def kinds(fn) -> set:
        return {p.kind for p in inspect.signature(fn).parameters.values()}

    for cls in (BalancedTopKRouter, BalancedNoisyTopKRouter, NoisyTopKRouter, ProductKeyRouter):
        assert inspect.Parameter.VAR_KEYWORD in kinds(cls.__init__), cls.__name__
    assert inspect.Parameter.VAR_KEYWORD in kinds(BalancedTopKRouter.routing)
    assert {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} <= kinds(ProductKeyRouter.forward)
