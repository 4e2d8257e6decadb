"""Megatron's argument dump (about 850 lines, every flag) written to a file instead of the console.

``validate_args`` ends with ``_print_args("arguments", args)``, which prints every argument on rank 0: on our
5-iteration demo that is 856 of its ~1,030 log lines, before the first iteration. The integration table's row
``args-dump`` wraps ``megatron.training.arguments._print_args`` (looked up as a module global at that call) so
that rank 0 writes the same text to ``<--save>/arguments.txt`` and prints one line saying where; without
``--save`` the line says how to get them. ``MEGATRON_MOE_EXT_PRINT_ARGS=1`` prints them as Megatron does. The
checkpoint keeps the full namespace anyway (its common state), which ``export-hf`` and ``analyze`` read.
"""

from __future__ import annotations

import functools
import os
from typing import Any

PRINT_ENV = "MEGATRON_MOE_EXT_PRINT_ARGS"
FILE_NAME = "arguments.txt"


def format_args(title: str, args: Any) -> str:
    """Megatron's dump text (the same lines ``_print_args`` prints)."""
    lines = [f"  {name} {'.' * (48 - len(name))} {value}" for name, value in vars(args).items()]
    return "\n".join([f"------------------------ {title} ------------------------",
                      *sorted(lines, key=str.lower), f"-------------------- end of {title} ---------------------"])


def dump_args(title: str, args: Any, *, print_fn=print) -> str | None:
    """Write the dump to ``<args.save>/arguments.txt`` and print one line; returns the path (None without --save)."""
    save = getattr(args, "save", None)
    count = len(vars(args))
    if not save:
        print_fn(f"> {title}: {count} values (pass --save to get them in <save>/{FILE_NAME}, or set "
                 f"{PRINT_ENV}=1 to print them here)")
        return None
    os.makedirs(save, exist_ok=True)
    path = os.path.join(save, FILE_NAME)
    with open(path, "w") as f:
        f.write(format_args(title, args) + "\n")
    print_fn(f"> {title}: {count} values written to {path} ({PRINT_ENV}=1 prints them here)")
    return path


def wrap_print_args(original):
    """Row ``args-dump``: ``_print_args(title, args)`` writing to a file on rank 0 (see the module docstring)."""

    @functools.wraps(original)
    def print_args_to_file(title: str, args: Any) -> None:
        if os.environ.get(PRINT_ENV) == "1":
            return original(title, args)
        from megatron.training.utils import is_rank0

        if is_rank0():
            dump_args(title, args, print_fn=lambda line: print(line, flush=True))
        return None

    return print_args_to_file
