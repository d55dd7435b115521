"""Gao et al.'s forms: the fits recover known coefficients from generated curves, peaks in closed
form, and bad input is named."""

import math

import numpy as np
import pytest

from tether.lab import fit_gao, gao_curve
from tether.lab.fits import points_from_metrics


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_exact_curves_are_recovered(form):
    kl = np.array([0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
    gain = gao_curve(form, np.sqrt(kl), 0.8, 0.15)
    fit = fit_gao(form, kl, gain)
    assert fit.alpha == pytest.approx(0.8, abs=1e-10) and fit.beta == pytest.approx(0.15, abs=1e-10)
    assert fit.r2 == pytest.approx(1.0) and fit.n == 7


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_noisy_curves_within_a_few_standard_errors(form):
    """With noise σ on R at 40 points, the least-squares α̂ is within 4 standard errors, the
    standard error taken from the design (σ²·(XᵀX)⁻¹)."""
    rng = np.random.default_rng(0)
    kl = np.linspace(0.05, 25, 40)
    d = np.sqrt(kl)
    sigma = 0.02
    gain = gao_curve(form, d, 0.5, 0.1) + rng.normal(0, sigma, d.shape)
    fit = fit_gao(form, kl, gain)
    second = d**2 if form == "bon" else d * np.log(d)
    x = np.stack([d, -second], 1)
    se = np.sqrt(np.diag(sigma**2 * np.linalg.inv(x.T @ x)))
    assert abs(fit.alpha - 0.5) < 4 * se[0] and abs(fit.beta - 0.1) < 4 * se[1]
    assert 0.9 < fit.r2 <= 1.0


def test_peaks_in_closed_form():
    bon = fit_gao("bon", [1.0, 4.0, 9.0], gao_curve("bon", np.array([1.0, 2.0, 3.0]), 1.0, 0.25))
    assert bon.peak_d == pytest.approx(2.0) and bon.peak_kl == pytest.approx(4.0)
    assert bon.peak_gain == pytest.approx(2.0 * (1.0 - 0.25 * 2.0))
    d = np.array([0.5, 1.0, 2.0, 4.0])
    rl = fit_gao("rl", d**2, gao_curve("rl", d, 0.6, 0.3))
    assert rl.peak_d == pytest.approx(math.exp(0.6 / 0.3 - 1))
    # the derivative vanishes at the peak
    eps = 1e-5
    slope = float(rl(rl.peak_d + eps) - rl(rl.peak_d - eps)) / (2 * eps)
    assert slope == pytest.approx(0, abs=1e-6)
    rising = fit_gao("bon", [1.0, 4.0, 9.0], [1.0, 2.0, 3.0])  # R = d: never turns down
    assert rising.beta == pytest.approx(0.0, abs=1e-12) and rising.peak_d > 1e6


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="one length"):
        fit_gao("bon", [1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 points"):
        fit_gao("rl", [0.0, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="KL must be ≥ 0"):
        fit_gao("bon", [-0.5, 1.0, 2.0], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="form must be"):
        fit_gao("ppo", [1.0, 2.0], [1.0, 2.0])  # type: ignore[arg-type]
    # estimator noise just below 0 is clipped, not an error
    assert fit_gao("bon", [-1e-8, 1.0, 4.0], [0.0, 0.9, 1.6]).n == 3


def test_points_from_metrics_then_fit():
    d = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    gold = 0.3 + gao_curve("rl", d, 0.5, 0.2)  # the run's gold starts at 0.3
    records = [{"step": 0, "score": 0.1}]  # a training line without eval metrics is skipped
    records += [
        {"step": 10 * i, "eval/kl/exact": float(x * x), "eval/gold/g": float(g)}
        for i, (x, g) in enumerate(zip(d, gold, strict=True))
    ]
    kl, gain = points_from_metrics(records, "eval/gold/g")
    assert kl == pytest.approx(list(d**2)) and gain[0] == 0.0
    fit = fit_gao("rl", kl, gain)
    assert fit.alpha == pytest.approx(0.5) and fit.beta == pytest.approx(0.2)
    with pytest.raises(ValueError, match="eval/gold/missing"):
        points_from_metrics(records, "eval/gold/missing")
