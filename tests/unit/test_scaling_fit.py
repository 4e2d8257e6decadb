"""Scaling-law fits (megatron_moe_ext.scaling.fitting / results_table / laws): known-answer recovery from synthetic
results with noise, the objective's analytic gradient against finite differences, and refusals of bad input.

Legend: N params, D tokens, G granularity, E experts; TRUE_* the coefficients the synthetic data is drawn from.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from scipy.special import huber, logsumexp

from megatron_moe_ext.scaling import fitting, laws, results_table

TRUE_K = {"a": 18.1, "alpha": 0.115, "b": 30.8, "beta": 0.147, "g": 2.1, "gamma": 0.58, "c": 0.47}
TRUE_J = {"a": 20.0, "alpha": 0.12, "b": 30.0, "beta": 0.15, "c": 0.5, "delta": -0.05, "gamma": 0.01, "omega": 0.03,
          "zeta": 0.005}


def _krajewski_points(seed: int, noise: float = 0.003) -> fitting.Points:
    rng = np.random.default_rng(seed)
    grid = np.array([(n, d, g) for n in (1e8, 3e8, 1e9, 3e9) for d in (1e9, 4e9, 16e9) for g in (1, 4, 16)])
    loss = laws.krajewski2024_loss(grid[:, 0], grid[:, 1], grid[:, 2], **TRUE_K) * np.exp(rng.normal(0, noise, len(grid)))
    return fitting.Points(grid[:, 0], grid[:, 1], grid[:, 2], loss)


def test_law_formula_equals_its_log_sum_exp_features() -> None:
    """exp(LSE_t(F_t theta)) is the law itself (the parametrisation the fit optimises), for both laws."""
    n, d, x = np.array([1e8, 3e9]), np.array([2e9, 5e10]), np.array([2.0, 16.0])
    for law, true, formula in (("krajewski2024", TRUE_K, laws.krajewski2024_loss), ("joint2025", TRUE_J, laws.joint2025_loss)):
        theta = laws.to_theta(law, true)
        z = np.stack([f @ theta for f in laws.features(law, n, d, x)], axis=1)
        np.testing.assert_allclose(np.exp(logsumexp(z, axis=1)), formula(n, d, x, **true), rtol=1e-12)
        assert laws.from_theta(law, theta) == pytest.approx(true)
    # Hand value: c + (g / G^gamma + a) / N^alpha + b / D^beta at N = 1e9, D = 2e10, G = 8.
    hand = 0.47 + (2.1 / 8**0.58 + 18.1) / 1e9**0.115 + 30.8 / 2e10**0.147
    assert laws.krajewski2024_loss(1e9, 2e10, 8, **TRUE_K) == pytest.approx(hand, rel=1e-12)


def test_objective_gradient_matches_finite_differences() -> None:
    """The analytic gradient of sum Huber(LSE - log L) / delta^2 against central differences of scipy's huber/logsumexp."""
    pts = _krajewski_points(0, noise=0.02)
    feats = laws.features("krajewski2024", pts.params, pts.tokens, pts.other)
    theta = laws.to_theta("krajewski2024", {**TRUE_K, "a": 15.0, "beta": 0.16})
    log_y = np.log(pts.loss)
    eye = np.eye(len(theta))
    value, grad = fitting._objective(theta, feats, [np.zeros(len(pts))] * len(feats), log_y, 1e-3)

    def reference(t: np.ndarray) -> float:
        z = np.stack([f @ t for f in feats], axis=1)
        return float(np.sum(huber(1e-3, logsumexp(z, axis=1) - log_y))) / 1e-3**2  # the fit's scaling

    assert value == pytest.approx(reference(theta), rel=1e-12)
    h = 1e-6
    numeric = np.array([(reference(theta + h * e) - reference(theta - h * e)) / (2 * h) for e in eye])
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-9)


def test_fit_recovers_known_krajewski_coefficients_within_bootstrap_intervals() -> None:
    pts = _krajewski_points(1)
    result = fitting.fit_law("krajewski2024", pts, bootstrap=30, confidence=0.95, seed=0, grid="small")
    for name, true in TRUE_K.items():
        lo, hi = result.intervals[name]
        assert lo <= true <= hi, f"{name}: true {true} outside [{lo}, {hi}] (fit {result.coefficients[name]})"
        assert lo <= result.coefficients[name] <= hi
    # Noise of 0.3% on losses around 3 is ~0.009 in loss units: the fit's errors are of that size, not larger.
    assert result.rmse < 0.012
    assert result.rmse <= result.heldout_rmse < 0.02
    # The exponents, the identifiable part, are close.
    assert abs(result.coefficients["alpha"] - 0.115) < 0.02 and abs(result.coefficients["gamma"] - 0.58) < 0.1


def test_noise_free_fit_is_exact_and_fix_holds_a_coefficient() -> None:
    pts = _krajewski_points(2, noise=0.0)
    coeffs, _ = fitting.fit_points("krajewski2024", pts, grid="small")
    for name, true in TRUE_K.items():
        assert coeffs[name] == pytest.approx(true, rel=2e-3), name
    # Holding alpha (and c) at their true values: the held terms enter as offsets, the rest is still exact.
    held, _ = fitting.fit_points("krajewski2024", pts, fixed={"alpha": 0.115, "c": 0.47}, grid="small")
    assert held["alpha"] == 0.115 and held["c"] == 0.47
    for name in ("a", "b", "beta", "g", "gamma"):
        assert held[name] == pytest.approx(TRUE_K[name], rel=2e-3), name


def test_fit_recovers_the_joint_law() -> None:
    rng = np.random.default_rng(2)
    grid = np.array([(n, d, e) for n in (1e7, 3e7, 1e8, 3e8) for d in (1e9, 4e9, 16e9) for e in (1, 4, 16, 64)])
    loss = laws.joint2025_loss(grid[:, 0], grid[:, 1], grid[:, 2], **TRUE_J) * np.exp(rng.normal(0, 0.002, len(grid)))
    coeffs, _ = fitting.fit_points("joint2025", fitting.Points(grid[:, 0], grid[:, 1], grid[:, 2], loss), grid="small")
    for name in ("alpha", "beta", "gamma"):
        assert coeffs[name] == pytest.approx(TRUE_J[name], abs=0.01), name
    assert coeffs["c"] == pytest.approx(TRUE_J["c"], abs=0.1)


def _write(path, header, rows) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_results_table_reads_moe_rows_and_counts_dense_ones(tmp_path) -> None:
    path = _write(tmp_path / "r.csv", ["run", "kind", "params", "total_params", "tokens", "granularity", "experts", "loss"],
                  [["a", "moe", 1e6, 4e6, 1e8, 2, 8, 3.5], ["b", "dense_equal_compute", 1e6, 1e6, 1e8, "", "", 3.9],
                   ["c", "moe", 2e6, 8e6, 1e8, 4, 16, 3.3]])
    table = results_table.read_results([path, path], law="krajewski2024")
    assert table.dense_rows == 2 and len(table.points) == 4
    assert list(table.points.params[:2]) == [1e6, 2e6] and list(table.points.other[:2]) == [2, 4]
    total = results_table.read_results([path], law="joint2025", params_column="total_params")
    assert list(total.points.params) == [4e6, 8e6] and list(total.points.other) == [8, 16]


def test_bad_tables_are_refused_with_values_and_fix(tmp_path) -> None:
    missing = _write(tmp_path / "m.csv", ["params", "tokens", "loss"], [[1e6, 1e8, 3.0]])
    with pytest.raises(ValueError, match=r"missing column\(s\) granularity.*fix"):
        results_table.read_results([missing], law="krajewski2024")
    with pytest.raises(ValueError, match="missing column.*experts"):
        results_table.read_results([_write(tmp_path / "j.csv", ["params", "tokens", "granularity", "loss"],
                                           [[1e6, 1e8, 1, 3.0]])], law="joint2025")
    text = _write(tmp_path / "t.csv", ["params", "tokens", "granularity", "loss"], [[1e6, "lots", 1, 3.0]])
    with pytest.raises(ValueError, match=r"line 2: tokens='lots' is not a number; fix"):
        results_table.read_results([text], law="krajewski2024")
    negative = _write(tmp_path / "n.csv", ["params", "tokens", "granularity", "loss"], [[1e6, 1e8, 1, -1.0]])
    with pytest.raises(ValueError, match=r"loss=-1.0 must be a finite number > 0"):
        results_table.read_results([negative], law="krajewski2024")
    with pytest.raises(ValueError, match="cannot read results table"):
        results_table.read_results([str(tmp_path / "absent.csv")], law="krajewski2024")


def test_too_few_points_and_unidentifiable_coefficients_are_refused() -> None:
    pts = _krajewski_points(3)
    few = pts.take(np.arange(5))
    with pytest.raises(ValueError, match=r"5 points cannot fit the 7 free coefficients.*need at least 8; fix"):
        results_table.check_identifiable(few, law="krajewski2024", fixed={})
    one_size = pts.take(np.flatnonzero(pts.params == 1e8))
    with pytest.raises(ValueError, match=r"1 distinct params value\(s\) \(values within 5% counted as one\) cannot identify alpha.*--fix alpha=0.115"):
        results_table.check_identifiable(one_size, law="krajewski2024", fixed={})
    results_table.check_identifiable(one_size, law="krajewski2024", fixed={"alpha": 0.115})
    two_g = pts.take(np.flatnonzero(pts.other != 16))
    with pytest.raises(ValueError, match=r"2 distinct granularity value\(s\) cannot identify gamma"):
        results_table.check_identifiable(two_g, law="krajewski2024", fixed={})
    with pytest.raises(ValueError, match=r"krajewski2024 has no coefficient 'zeta'"):
        fitting.parse_fixed(["zeta=1"], "krajewski2024")
    with pytest.raises(ValueError, match="is not NAME=VALUE; fix: e.g. --fix alpha=0.115"):
        fitting.parse_fixed(["alpha"], "krajewski2024")


def test_sizes_within_five_percent_count_as_one_and_runaway_coefficients_stay_finite() -> None:
    # A compute-matched sweep at one hidden size: N differs between G only by the router's parameters.
    assert results_table.distinct_sizes(np.array([166512.0, 166896.0, 172272.0])) == 1
    assert results_table.distinct_sizes(np.array([166512.0, 172272.0, 369888.0, 381408.0])) == 2
    assert results_table.distinct_sizes(np.array([1e6, 1.06e6])) == 2
    coeffs = laws.from_theta("krajewski2024", np.array([1000.0, 0.1, -1000.0, 0.1, 1.0, 0.5, 0.0]))
    assert np.isfinite(list(coeffs.values())).all() and coeffs["a"] > 1e300 and coeffs["b"] < 1e-300


def test_degenerate_terms_are_named() -> None:
    # The CPU study's fit (docs/sweeps.md): N, G and floor terms collapsed, only b/D^beta left.
    study = {"a": 9.86e-305, "alpha": -29.15, "b": 11.7, "beta": 0.118, "g": 3.25e-164, "gamma": 0.354, "c": 6.1e-7}
    names = [t.split()[0] for t in fitting.degenerate_terms("krajewski2024", study)]
    assert names == ["N", "G", "floor"]
    assert fitting.degenerate_terms("krajewski2024", laws.PRESETS["krajewski2024"].coefficients) == []
