"""Import layering, enforced: the contracts in .importlinter (import-linter) hold for the shipped package.

Shipped code never imports testing/; converters (checkpoint/) never import analysis or training; each package
imports only the packages below it (cli > launch > analysis > training > checkpoint > runtime > integration > args
> config > specs > layers > balancing > kernels > accounting > settings > _compat); no cycles between siblings.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold(capsys) -> None:
    from importlinter.cli import lint_imports

    cwd = os.getcwd()
    os.chdir(ROOT)  # import-linter resolves the root package from the working directory's sys.path
    try:
        rc = lint_imports(config_filename=str(ROOT / ".importlinter"), no_cache=True)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert rc == 0, out[-4000:]
    assert "broken" not in out.lower().replace("0 broken", ""), out[-4000:]
