"""benchmarks/granularity_study.py: the verdict arithmetic on a results table with known losses."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIELDS = ["run", "kind", "seed", "budget_flops", "granularity", "loss"]


def _study_module():
    spec = importlib.util.spec_from_file_location("granularity_study", REPO / "benchmarks" / "granularity_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, losses: dict[tuple[str, int], tuple[float, float]]) -> None:
    with open(path / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for (config, hidden), pair in losses.items():
            for seed, loss in zip((1, 2), pair):
                kind = "moe" if config.startswith("G") else config
                name = f"b1e12_h{hidden}_{config}_s{seed}"
                writer.writerow({"run": name, "kind": kind, "seed": seed, "budget_flops": 1e12,
                                 "granularity": config[1:] if kind == "moe" else "", "loss": loss})


def test_verdicts_and_seed_noise(tmp_path: Path) -> None:
    # Cell h48: every configuration (dense baselines too)'s two seeds differ by 0.02 -> s = sqrt(0.02^2 / 2) = 0.01414; G16 - G1 = -0.1.
    # Cell h96: the same noise, G16 - G1 = +0.01 (inside 2 s).
    losses = {}
    for g, base in ((1, 3.0), (4, 2.95), (16, 2.9)):
        losses[(f"G{g}", 48)] = (base - 0.01, base + 0.01)
        losses[(f"G{g}", 96)] = (3.0 + (0.01 if g == 16 else 0.0) - 0.01, 3.0 + (0.01 if g == 16 else 0.0) + 0.01)
    for kind in ("dense_equal_compute", "dense_equal_params"):
        losses[(kind, 48)] = (3.09, 3.11)
        losses[(kind, 96)] = (3.09, 3.11)
    _write(tmp_path, losses)
    text = _study_module().summarize(tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| 1e+12")]
    assert len(rows) == 2
    s = math.sqrt(0.02**2 / 2)
    assert f"| -0.1000 | {s:.4f} | finer better |" in rows[0]
    assert f"| +0.0100 | {s:.4f} | no difference within the seed spread |" in rows[1]
    # slope of loss against log2 G in cell h48: points (0, 3.0), (2, 2.95), (4, 2.9) -> -0.025 per doubling
    assert rows[0].endswith("| -0.0250 |")
    assert "finer better: 1" in text and "no difference within the seed spread: 1" in text
