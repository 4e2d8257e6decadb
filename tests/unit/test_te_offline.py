"""The pure half of scripts/te_offline.py: split, join and manifest checks (the GPU half needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("te_offline", Path(__file__).parents[2] / "scripts" / "te_offline.py")
te_offline = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(te_offline)


def test_split_join_round_trip_and_manifest(tmp_path: Path) -> None:
    data = os.urandom(2500)
    wheel = tmp_path / "te_core.whl"
    wheel.write_bytes(data)
    manifest = {"files": [{"name": wheel.name, "size": len(data), "sha256": te_offline.sha256(wheel)}]}
    parts = te_offline.split_file(wheel, 1000)
    assert [p.name for p in parts] == ["te_core.whl.part000", "te_core.whl.part001", "te_core.whl.part002"]
    assert not wheel.exists() and [p.stat().st_size for p in parts] == [1000, 1000, 500]
    (joined,) = te_offline.check_manifest(tmp_path, manifest)
    assert joined.read_bytes() == data
    small = tmp_path / "meta.whl"
    small.write_bytes(b"x")
    assert te_offline.split_file(small, 1000) == [small]


def test_missing_or_corrupt_parts_are_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "a.whl"
    wheel.write_bytes(os.urandom(300))
    manifest = {"files": [{"name": "a.whl", "size": 300, "sha256": te_offline.sha256(wheel)}]}
    parts = te_offline.split_file(wheel, 100)
    parts[1].unlink()
    with pytest.raises(ValueError, match=r"parts \[0, 2\] are not 0..1"):
        te_offline.check_manifest(tmp_path, manifest)
    parts[1].write_bytes(b"\0" * 100)
    with pytest.raises(ValueError, match="differ from the manifest"):
        te_offline.check_manifest(tmp_path, json.loads(json.dumps(manifest)))
    with pytest.raises(ValueError, match="part size 0"):
        te_offline.split_file(parts[0], 0)
