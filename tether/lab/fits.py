"""Gao et al.'s over-optimisation curves: the gold reward as a function of d = √KL(π‖π_init).

Gao, Schulman & Hilton 2022 ("Scaling Laws for Reward Model Overoptimization", arXiv:2210.10760,
eq. 1–2) fit the gold reward gain R(d) = r_gold(π) − r_gold(π_init) with

* best-of-n:  R_bon(d) = d·(α − β·d)
* RL:         R_RL(d)  = d·(α − β·log d)

with d = √KL and R(0) = 0 (no movement, no gain). Both are *linear* in (α, β), so the fit is an
ordinary least-squares solve with no initial guess: design columns (d, −d²) and (d, −d·log d)
(d·log d → 0 as d → 0, so a d = 0 point contributes 0 = 0 and is allowed). The gold peaks where
dR/dd = 0: d* = α/(2β) for best-of-n and d* = exp(α/β − 1) for RL (a maximum when β > 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Form = Literal["bon", "rl"]


@dataclass(frozen=True)
class GaoFit:
    """A least-squares fit of one of Gao et al.'s forms.

    Attributes:
        form: ``"bon"`` (R = d(α − βd)) or ``"rl"`` (R = d(α − β log d)).
        alpha, beta: the coefficients.
        r2: the coefficient of determination of the fit, 1 − SS_res / SS_tot about the mean of R
            (nan with fewer than 3 points or constant R).
        n: the number of points fitted.
    """

    form: Form
    alpha: float
    beta: float
    r2: float
    n: int

    def __call__(self, d: float | np.ndarray) -> np.ndarray:
        """R(d) under the fit (d ≥ 0; R(0) = 0)."""
        return gao_curve(self.form, np.asarray(d, dtype=np.float64), self.alpha, self.beta)

    @property
    def peak_d(self) -> float:
        """d* where the fitted gold peaks: α/(2β) (best-of-n) or exp(α/β − 1) (RL); inf when
        β ≤ 0 (the fitted curve never turns down)."""
        if self.beta <= 0:
            return math.inf
        if self.form == "bon":
            return self.alpha / (2 * self.beta)
        return math.exp(self.alpha / self.beta - 1)

    @property
    def peak_kl(self) -> float:
        """KL at the peak (nats): d*²."""
        return self.peak_d**2

    @property
    def peak_gain(self) -> float:
        """R(d*): the largest gold gain the fitted curve reaches (inf when it never peaks)."""
        d = self.peak_d
        return math.inf if math.isinf(d) else float(self(d))


def _dlogd(d: np.ndarray) -> np.ndarray:
    """d·log d with its limit 0 at d = 0."""
    out = np.zeros_like(d)
    pos = d > 0
    out[pos] = d[pos] * np.log(d[pos])
    return out


def gao_curve(form: Form, d: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """R(d) = d(α − βd) (``"bon"``) or d(α − β log d) (``"rl"``), elementwise, float64."""
    d = np.asarray(d, dtype=np.float64)
    if np.any(d < 0):
        raise ValueError("d = √KL must be ≥ 0")
    if form == "bon":
        return d * alpha - beta * d**2
    if form == "rl":
        return d * alpha - beta * _dlogd(d)
    raise ValueError(f"form must be 'bon' or 'rl', got {form!r}")


def fit_gao(form: Form, kl: Sequence[float], gain: Sequence[float]) -> GaoFit:
    """Fit Gao et al.'s ``form`` to gold-reward gains ``gain`` at KLs ``kl`` (nats, ≥ 0).

    Args:
        form: ``"bon"`` or ``"rl"``.
        kl: (m,) KL(π‖π_init) of each point; d = √KL. Small negative values (estimator noise,
            ≥ −1e-6) are clipped to 0; more negative ones are an error.
        gain: (m,) r_gold(π) − r_gold(π_init) at each point.

    Raises:
        ValueError: lengths differ, fewer than 2 points with d > 0, a non-finite value, or a KL
            below −1e-6.
    """
    k = np.asarray(kl, dtype=np.float64)
    r = np.asarray(gain, dtype=np.float64)
    if k.shape != r.shape or k.ndim != 1:
        raise ValueError(f"kl and gain must be 1-D of one length, got {k.shape} and {r.shape}")
    if not (np.all(np.isfinite(k)) and np.all(np.isfinite(r))):
        raise ValueError("kl and gain must be finite")
    if np.any(k < -1e-6):
        raise ValueError(f"KL must be ≥ 0, got min {k.min():.4g}")
    d = np.sqrt(np.clip(k, 0.0, None))
    if int((d > 0).sum()) < 2:
        raise ValueError("a Gao fit needs at least 2 points with KL > 0")
    second = d**2 if form == "bon" else _dlogd(d) if form == "rl" else None
    if second is None:
        raise ValueError(f"form must be 'bon' or 'rl', got {form!r}")
    design = np.stack([d, -second], axis=1)  # (m, 2): R = α·d − β·second
    (alpha, beta), *_ = np.linalg.lstsq(design, r, rcond=None)
    pred = design @ np.array([alpha, beta])
    ss_tot = float(((r - r.mean()) ** 2).sum())
    r2 = 1.0 - float(((r - pred) ** 2).sum()) / ss_tot if len(r) >= 3 and ss_tot > 0 else math.nan
    return GaoFit(form, float(alpha), float(beta), r2, len(r))


def points_from_metrics(
    records: Sequence[dict], reward_key: str, kl_key: str = "eval/kl/exact"
) -> tuple[list[float], list[float]]:
    """(KL, gain) points of a run's held-out evaluations (``metrics.jsonl`` records, in order):
    each record that has both keys gives (record[kl_key], record[reward_key] − the first such
    record's reward), so the first point is (KL₀, 0) — at step 0, (0, 0).

    Raises:
        ValueError: no record has both keys (names them).
    """
    rows = [r for r in records if r.get(kl_key) is not None and r.get(reward_key) is not None]
    if not rows:
        raise ValueError(f"no metrics record has both {kl_key!r} and {reward_key!r}")
    base = float(rows[0][reward_key])
    return [float(r[kl_key]) for r in rows], [float(r[reward_key]) - base for r in rows]
