"""Outputs of the scaling lab written atomically: a temporary file in the target's directory, then ``os.replace``
(a reader never sees half a table, a killed command leaves no partial file)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_text_atomic(path: str, text: str) -> None:
    """``text`` to ``path``; ValueError naming the fix when the directory does not exist."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{path}: directory {directory} does not exist; fix: create it or choose another path")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, obj: Any) -> None:
    """``obj`` as indented JSON (one trailing newline) to ``path``, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
