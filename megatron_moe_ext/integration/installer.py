"""Apply the integration table (``table.py``) and check it against the installed megatron-core.

``install(groups)`` is the one function that replaces anything in Megatron: the CPU runtime installs
group ``cpu``, every rank setup (``runtime.rank.setup_rank``: train, launch, the patched script,
analysis and import ranks) the groups its entry needs. It first runs ``check`` on those rows, so a
megatron-core that changed under a row fails at start-up with one error naming the row, instead of a
wrong result or a traceback deep in a rank. Installing is idempotent (a replaced attribute carries
the row name) and the originals are kept (``original(name)``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Iterable, Iterator
from typing import Any

from megatron_moe_ext.integration.table import REPLACEMENTS, SEAMS, Replacement, rows

MARK = "_megatron_moe_ext_row"
_ORIGINALS: dict[str, Any] = {}
_SEAMS_CHECKED: list[bool] = []  # [True] once install() has checked the seams in this process


class IntegrationError(RuntimeError):
    """The installed megatron-core does not have what a row of the integration table relies on."""


def _resolve(target: str) -> tuple[Any, str, Any]:
    """``module:a.b.c`` -> (owner object, attribute name, current value); raises AttributeError/ImportError."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, attr, inspect.getattr_static(owner, attr) if isinstance(owner, type) else getattr(owner, attr)


def _unwrap(value: Any) -> Any:
    """The function a row relies on, through our own replacement (its original) and functools.partial."""
    while True:
        name = getattr(value, MARK, None)
        if name is not None and name in _ORIGINALS:
            value = _ORIGINALS[name]
        elif hasattr(value, "func") and hasattr(value, "keywords"):  # functools.partial
            value = value.func
        elif isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        else:
            return value


def _problem(target: str, params: Iterable[str]) -> str | None:
    """Why ``target`` does not fit (missing, not callable, a parameter gone), or None."""
    try:
        _, _, value = _resolve(target)
    except (ImportError, AttributeError) as err:
        return f"{target} does not exist ({type(err).__name__}: {err})"
    value = _unwrap(value)
    if not callable(value):
        return f"{target} is not callable ({type(value).__name__})"
    needed = list(params)
    if not needed:
        return None
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return None  # builtins without a signature: existence is all we can check
    names = set(signature.parameters)
    missing = [p for p in needed if p not in names]
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    if missing and not takes_kwargs:
        return f"{target}{signature} no longer takes {', '.join(missing)}"
    return None


def check(groups: Iterable[str] | None = None, *, seams: bool = True,
          table: Iterable[Replacement] | None = None) -> list[str]:
    """Problems of the rows of ``groups`` (all for None; or of the rows ``table``) and of the seams, one line each
    naming the row. Empty when the installed megatron-core has everything the table relies on."""
    problems = []
    selected = rows(None if groups is None else tuple(groups)) if table is None else tuple(table)
    for row in selected:
        problem = _problem(row.target, row.params)
        if problem is not None:
            problems.append(f"integration row {row.name!r}: {problem} (checked with megatron-core "
                            f"{', '.join(row.checked)}; reason for the row: {row.reason})")
    if seams:
        for seam in SEAMS:
            problem = _problem(seam.target, seam.params)
            if problem is not None:
                problems.append(f"seam used by {seam.used_by}: {problem}")
    return problems


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise IntegrationError(
            f"megatron-moe-ext cannot hook this megatron-core ({_describe_megatron()}):\n  "
            + "\n  ".join(problems)
            + "\nFix: use a megatron-core in the supported range (docs/megatron-versions.md), or report the row "
            "named above (docs/integration.md lists what each row does)."
        )


def _describe_megatron() -> str:
    try:
        import megatron.core as core
        from megatron.core import package_info
    except ImportError as err:
        return f"not importable: {err}"
    return f"{package_info.__version__} from {core.__file__}"


def _replacement(row: Replacement, current: Any) -> Any:
    """The row's wrapper applied to ``current``: the replacement, or None when the wrapper declines."""
    module_name, _, function = row.wrapper.partition(":")
    return getattr(importlib.import_module(module_name), function)(current)


def _apply(row: Replacement) -> bool:
    owner, attr, current = _resolve(row.target)
    if getattr(current, MARK, None) == row.name:
        return False
    replacement = _replacement(row, current)
    if replacement is None:  # the wrapper declined (e.g. telemetry without NVML)
        return False
    try:
        setattr(replacement, MARK, row.name)
    except (AttributeError, TypeError):  # e.g. a bound builtin: keep the row name beside it
        raise IntegrationError(f"integration row {row.name!r}: the replacement cannot carry its mark") from None
    _ORIGINALS.setdefault(row.name, current)
    setattr(owner, attr, replacement)
    return True


def install(groups: Iterable[str], *, only: Iterable[str] | None = None) -> list[str]:
    """Check, then apply the rows of ``groups`` (or just the rows named in ``only``); returns the names applied now."""
    selected = [r for r in rows(tuple(groups)) if only is None or r.name in set(only)]
    # The seams once per process (every entry installs twice: the CPU runtime's group, then the rank's).
    seams = only is None and not _SEAMS_CHECKED
    _raise_problems(check(table=selected, seams=seams))
    if seams:
        _SEAMS_CHECKED.append(True)
    return [row.name for row in selected if _apply(row)]


def markdown_table() -> str:
    """The table as Markdown (docs/integration.md embeds exactly this; a test keeps them equal)."""
    lines = ["| row | group | replaces | why | seam that would remove it | checked |", "|---|---|---|---|---|---|"]
    for r in REPLACEMENTS:
        lines.append(f"| `{r.name}` | {r.group} | `{r.target}` | {r.reason} | {r.seam} | {', '.join(r.checked)} |")
    lines += ["", "| seam used as it is | parameters relied on | used by |", "|---|---|---|"]
    for s in SEAMS:
        lines.append(f"| `{s.target}` | {', '.join(s.params) or '-'} | {s.used_by} |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def temporarily(names: Iterable[str]) -> Iterator[None]:
    """The named rows in place for the ``with`` block only (checked first), the previous attributes restored after:
    for a launcher that runs a Megatron check the ranks run under the row (e.g. ``cpu-device-arch`` while it
    validates the arguments without enabling the CPU runtime)."""
    wanted = [r for r in REPLACEMENTS if r.name in set(names)]
    missing = set(names) - {r.name for r in wanted}
    if missing:
        raise ValueError(f"unknown integration row(s) {sorted(missing)}")
    _raise_problems(check(table=wanted, seams=False))
    restore = []
    try:
        for row in wanted:
            owner, attr, current = _resolve(row.target)
            if getattr(current, MARK, None) == row.name:
                continue
            restore.append((owner, attr, current))
            replacement = _replacement(row, current)
            if replacement is not None:
                setattr(owner, attr, replacement)
        yield
    finally:
        for owner, attr, value in reversed(restore):
            setattr(owner, attr, value)


def installed() -> list[str]:
    """Names of the rows whose replacement is in place now."""
    names = []
    for row in REPLACEMENTS:
        try:
            _, _, value = _resolve(row.target)
        except (ImportError, AttributeError):
            continue
        if getattr(value, MARK, None) == row.name:
            names.append(row.name)
    return names


def original(name: str) -> Any:
    """The attribute a row replaced (KeyError if the row was not installed in this process)."""
    return _ORIGINALS[name]
