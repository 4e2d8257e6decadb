"""What a wheel ships: every directory of the package that holds Python files is a package (``packages =
find:`` silently leaves the others out of an installed copy), and the remote-code files export-hf copies exist."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[2]


def test_every_python_directory_is_found_by_setuptools():
    found = set(find_packages(str(ROOT), include=["megatron_moe_ext*"]))
    dirs = {p.parent for p in (ROOT / "megatron_moe_ext").rglob("*.py")}
    expected = {".".join(d.relative_to(ROOT).parts) for d in dirs}
    assert expected <= found, f"not packages (no __init__.py): {sorted(expected - found)}"
