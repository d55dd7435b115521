"""KL coefficient (β) controllers for objective = reward − β·KL(π_θ‖π_ref).

Every controller exposes ``beta`` (the coefficient to use now), ``update(observed_kl, n_steps)``
(feed the KL measured since the last update, get the new β back), and ``state_dict()`` /
``load_state_dict()`` so a resumed run continues exactly. Hyper-parameters are validated at
construction; a non-finite or negative observed KL is rejected at ``update``. Every error is a
``ValueError`` naming the offending parameter.

β never becomes NaN or infinite, and the multiplicative rules (adaptive, PPO penalty) never switch
it off: β = 0 is a fixed point of β ← β·m, so a β that reached 0 could never recover. The adaptive
rule's factor 1 + e·n_steps/horizon stays > 0 because ``update`` refuses a horizon ≤
max_error·n_steps; repeated shrinking stops at :data:`BETA_FLOOR` instead of underflowing to 0,
and growth stops at :data:`BETA_CEILING` instead of overflowing to inf. Inside those bounds every
rule is computed exactly as written (bit-for-bit).

* :class:`FixedKL` — a constant β.
* :class:`AdaptiveKL` — Ziegler et al. 2019 (arXiv:1909.08593 §2.2), as in their code
  (``lm_human_preferences/train_policy.py``, ``AdaptiveKLController``):
  β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon).
* :class:`PPOPenaltyKL` — Schulman et al. 2017 (arXiv:1707.06347 §4): halve β when
  KL < target/1.5, double it when KL > 1.5·target.
* :class:`PIDKL` — β as a Lagrange multiplier for the constraint KL ≤ target, driven by a PID
  controller on the constraint violation (Stooke, Achiam & Abbeel 2020, "Responsive Safety in RL
  by PID Lagrangian Methods", arXiv:2007.03964, Alg. 2), kept in [0, beta_max] with integral
  anti-windup.
"""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any

# Pure python, shared with the configs' checks (tether.configs imports no torch); re-exported.
from tether.configs.checks import DEFAULT_MAX_ERROR, check_horizon
from tether.configs.checks import smallest_valid_horizon as smallest_valid_horizon

BETA_FLOOR = sys.float_info.min
"""The smallest β the multiplicative controllers reach (the smallest normal float, ≈2.2e-308):
halving or shrinking β further would underflow it to 0, a β these rules could never leave."""
BETA_CEILING = sys.float_info.max
"""The largest β any controller reaches: doubling β further would overflow it to inf, and an
infinite penalty turns the loss into NaN."""
_FLOAT_MAX = sys.float_info.max


def _check_positive(name: str, value: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    bad = not math.isfinite(v) or (v < 0 if allow_zero else v <= 0)
    if bad:
        want = "a finite number ≥ 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return v


def _check_kl(observed_kl: float, n_steps: float) -> tuple[float, float]:
    try:
        kl = float(observed_kl)
    except (TypeError, ValueError):
        raise ValueError(f"observed_kl must be a number, got {observed_kl!r}") from None
    if not math.isfinite(kl):
        raise ValueError(f"observed_kl must be finite, got {kl} (NaN/inf KL: check the rollout)")
    if kl < 0:
        # Sampled k1 estimates can be slightly negative on a small batch; a negative *mean*
        # KL fed to a controller is a sign of a bug upstream, so refuse it loudly.
        raise ValueError(f"observed_kl must be ≥ 0, got {kl}")
    return kl, _check_positive("n_steps", n_steps)


class KLController:
    """Base class: a β and the rule that updates it. Subclasses implement ``_update``."""

    _state_keys: tuple[str, ...] = ("beta",)
    _multiplicative = False
    """Whether the rule multiplies β (then β = 0 is a fixed point it can never leave)."""

    def __init__(self, init_beta: float) -> None:
        self._beta = _check_positive("init_beta", init_beta, allow_zero=True)

    @property
    def beta(self) -> float:
        """The KL coefficient β to use now."""
        return self._beta

    def update(self, observed_kl: float, n_steps: float = 1) -> float:
        """Feed the KL observed over the last ``n_steps`` (e.g. samples) and return the new β."""
        kl, n = _check_kl(observed_kl, n_steps)
        self._update(kl, n)
        return self._beta

    def _update(self, kl: float, n_steps: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Mutable state (not the hyper-parameters, which come from the config on resume)."""
        state: dict[str, Any] = {"type": type(self).__name__}
        for key in self._state_keys:
            state[key] = getattr(self, "_" + key)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict` of the same controller type (a β that is
        not a finite number ≥ 0 is refused)."""
        if state.get("type") != type(self).__name__:
            raise ValueError(
                f"controller state is for {state.get('type')!r}, cannot load into "
                f"{type(self).__name__}"
            )
        missing = [k for k in self._state_keys if k not in state]
        if missing:
            raise ValueError(f"{type(self).__name__} state is missing keys {missing}")
        _check_restored_beta(state, positive=self._multiplicative)
        for key in self._state_keys:
            setattr(self, "_" + key, state[key])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self._beta:.6g})"


class FixedKL(KLController):
    """A constant β (TRL's default; the setting of most GRPO/RLOO papers)."""

    def __init__(self, beta: float) -> None:
        super().__init__(beta)

    def _update(self, kl: float, n_steps: float) -> None:
        return None


class AdaptiveKL(KLController):
    """Ziegler et al. 2019 (arXiv:1909.08593 §2.2) adaptive β, a proportional controller in log β.

    e = clip(KL/target − 1, −max_error, max_error);  β ← β·(1 + e·n_steps/horizon).
    ``n_steps`` is the number of samples (episodes) since the last update, so ``horizon`` is in
    samples: with the paper's horizon 10 000 and batch 512, β moves at most 1% per update. (The
    trainers pass the *global* number of samples: the rollout size × the number of processes.)

    The factor 1 + e·n_steps/horizon is > 0 for every e ≥ −max_error only if
    horizon > max_error·n_steps; at or below that a KL under target would set β to 0 (or
    below), where a multiplicative rule is stuck for good. ``update`` therefore raises a
    ``ValueError`` naming ``horizon`` (the configs' ``kl_horizon``) and the smallest valid value
    (:func:`smallest_valid_horizon`); β is also kept in [:data:`BETA_FLOOR`,
    :data:`BETA_CEILING`] against underflow and overflow over many updates.

    Args:
        init_beta: starting β (> 0; a multiplicative rule cannot leave 0).
        target: the KL to hold, in nats per sequence (or whatever unit ``observed_kl`` has).
        horizon: samples over which a full ``max_error`` correction compounds (> 0, and
            > max_error·n_steps at every ``update``).
        max_error: clip on the proportional error (0.2 in the paper).
        beta_min, beta_max: optional bounds on β.
    """

    _state_keys = ("beta",)
    _multiplicative = True

    def __init__(
        self,
        init_beta: float,
        target: float,
        horizon: float,
        max_error: float = DEFAULT_MAX_ERROR,
        beta_min: float = 0.0,
        beta_max: float = math.inf,
    ) -> None:
        super().__init__(_check_positive("init_beta", init_beta))
        self.target = _check_positive("target", target)
        self.horizon = _check_positive("horizon", horizon)
        self.max_error = _check_positive("max_error", max_error)
        self.beta_min, self.beta_max = _check_bounds(beta_min, beta_max, self._beta)

    def update(self, observed_kl: float, n_steps: float = 1) -> float:
        kl, n = _check_kl(observed_kl, n_steps)
        check_horizon(
            self.horizon,
            n,
            self.max_error,
            name="horizon (kl_horizon in the RL and online-DPO configs)",
            steps="n_steps",
            note="n_steps: the samples per update, the rollout size × the number of processes",
        )
        self._update(kl, n)
        return self._beta

    def _update(self, kl: float, n_steps: float) -> None:
        error = min(max(kl / self.target - 1.0, -self.max_error), self.max_error)
        mult = 1.0 + error * n_steps / self.horizon  # > 0: update() checked the horizon
        beta = max(self._beta * mult, self.beta_min, BETA_FLOOR)
        self._beta = min(beta, self.beta_max, BETA_CEILING)


class PPOPenaltyKL(KLController):
    """PPO's adaptive KL penalty coefficient (Schulman et al. 2017, arXiv:1707.06347 §4).

    After each policy update: if KL < target/tolerance, β ← β/factor; if KL > target·tolerance,
    β ← β·factor; otherwise β is unchanged. The paper's constants are tolerance 1.5 and
    factor 2. ``n_steps`` is ignored: the rule fires once per policy update.

    Args:
        init_beta: starting β (> 0).
        target: d_targ, the KL per update to aim for.
        tolerance: the band [target/tolerance, target·tolerance] in which β is left alone (> 1).
        factor: multiplier applied outside the band (> 1).
        beta_min, beta_max: optional bounds on β.

    β is also kept in [:data:`BETA_FLOOR`, :data:`BETA_CEILING`]: a KL below the band for a
    thousand updates in a row would otherwise halve β to exactly 0 (where doubling cannot bring
    it back), and one above it would double β to inf.
    """

    _multiplicative = True

    def __init__(
        self,
        init_beta: float,
        target: float,
        tolerance: float = 1.5,
        factor: float = 2.0,
        beta_min: float = 0.0,
        beta_max: float = math.inf,
    ) -> None:
        super().__init__(_check_positive("init_beta", init_beta))
        self.target = _check_positive("target", target)
        self.tolerance = _check_positive("tolerance", tolerance)
        self.factor = _check_positive("factor", factor)
        if self.tolerance <= 1.0:
            raise ValueError(f"tolerance must be > 1, got {tolerance!r}")
        if self.factor <= 1.0:
            raise ValueError(f"factor must be > 1, got {factor!r}")
        self.beta_min, self.beta_max = _check_bounds(beta_min, beta_max, self._beta)

    def _update(self, kl: float, n_steps: float) -> None:
        if kl < self.target / self.tolerance:
            beta = self._beta / self.factor
        elif kl > self.target * self.tolerance:
            beta = self._beta * self.factor
        else:
            return
        self._beta = min(max(beta, self.beta_min, BETA_FLOOR), self.beta_max, BETA_CEILING)


class PIDKL(KLController):
    """β as the Lagrange multiplier of KL ≤ target, set by a PID controller (Stooke et al. 2020).

    With the relative constraint violation e_k = (KL̃_k − target)/target, where KL̃ is the
    observed KL smoothed by an exponential moving average (``smoothing`` = weight on the past;
    Stooke et al. smooth the P and D inputs the same way)::

        I_k = clip(I_{k−1} + ki·e_k·n_steps, 0, beta_max)           integral, kept in β units
        D_k = max(0, KL̃_k − KL̃_{k−1}) / target / n_steps            only a rising KL is damped
        β_k = clip(kp·e_k + I_k + kd·D_k, 0, beta_max)

    This is Alg. 2 of arXiv:2007.03964 with the cost J_C = KL and the limit d = target. Two
    deliberate choices: the error is *relative* to the target, so the gains are dimensionless and
    carry over between a target of 0.05 and one of 6 nats; and the integral is stored in β units
    and clamped to [0, beta_max] (anti-windup both ways: the projection onto ≥ 0 of the paper,
    plus no accumulation beyond what β can use). ``init_beta`` pre-loads the integral, so the
    first β equals ``init_beta`` (a bumpless start). With kp = kd = 0 this is gradient ascent on
    the dual variable, the classic Lagrangian update. β = 0 is a legitimate state here (the
    constraint is slack; the integral brings β back once the KL exceeds the target). The error and
    derivative inputs are capped at the largest float, so an enormous (finite) KL over a tiny
    target gives β = beta_max rather than 0·inf = NaN with a zero gain.

    Args:
        target: the KL to hold (> 0).
        kp, ki, kd: gains (≥ 0), in β per unit relative error (ki: per unit error per step).
        init_beta: β before the first update (≥ 0, ≤ beta_max).
        beta_max: upper bound on β (> 0).
        smoothing: EMA weight on the past for the KL fed to P and D, in [0, 1).
    """

    _state_keys = ("beta", "integral", "smoothed_kl")

    def __init__(
        self,
        target: float,
        kp: float = 0.1,
        ki: float = 0.05,
        kd: float = 0.0,
        init_beta: float = 0.1,
        beta_max: float = 10.0,
        smoothing: float = 0.0,
    ) -> None:
        super().__init__(init_beta)
        self.target = _check_positive("target", target)
        self.kp = _check_positive("kp", kp, allow_zero=True)
        self.ki = _check_positive("ki", ki, allow_zero=True)
        self.kd = _check_positive("kd", kd, allow_zero=True)
        self.beta_max = _check_positive("beta_max", beta_max)
        if self._beta > self.beta_max:
            raise ValueError(f"init_beta ({init_beta}) must be ≤ beta_max ({beta_max})")
        self.smoothing = _check_positive("smoothing", smoothing, allow_zero=True)
        if self.smoothing >= 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        self._integral = self._beta
        self._smoothed_kl: float | None = None

    def _update(self, kl: float, n_steps: float) -> None:
        prev = self._smoothed_kl
        smoothed = kl if prev is None else self.smoothing * prev + (1.0 - self.smoothing) * kl
        smoothed = min(smoothed, _FLOAT_MAX)  # the weighted sum of two huge KLs may round to inf
        error = min((smoothed - self.target) / self.target, _FLOAT_MAX)  # ≥ −1, never inf
        self._integral = min(max(self._integral + self.ki * error * n_steps, 0.0), self.beta_max)
        rise = 0.0 if prev is None else max(0.0, smoothed - prev) / self.target / n_steps
        rise = min(rise, _FLOAT_MAX)
        beta = self.kp * error + self._integral + self.kd * rise
        self._beta = min(max(beta, 0.0), self.beta_max)
        self._smoothed_kl = smoothed

    @property
    def integral(self) -> float:
        """The integral term, in β units."""
        return self._integral


def _check_restored_beta(state: dict[str, Any], positive: bool) -> None:
    """A saved β must be a finite number ≥ 0 (> 0 for the multiplicative rules, for which 0 is a
    fixed point: such a state came from a run whose β had been switched off)."""
    beta = state.get("beta")
    if beta is None:  # a missing key is reported by the base class
        return
    ok = isinstance(beta, (int, float)) and not isinstance(beta, bool) and math.isfinite(beta)
    if not ok or beta < 0 or (positive and beta == 0):
        want = "a finite number > 0" if positive else "a finite number ≥ 0"
        raise ValueError(
            f"{state.get('type', 'controller')} state: beta must be {want}, got {beta!r}"
            + (" (a multiplicative rule cannot leave β = 0)" if positive and beta == 0 else "")
        )


def _check_bounds(beta_min: float, beta_max: float, beta: float) -> tuple[float, float]:
    lo = _check_positive("beta_min", beta_min, allow_zero=True)
    if isinstance(beta_max, bool) or not isinstance(beta_max, (int, float)) or math.isnan(beta_max):
        raise ValueError(f"beta_max must be a number, got {beta_max!r}")
    hi = float(beta_max)
    if hi <= lo:
        raise ValueError(f"beta_max ({beta_max}) must be > beta_min ({beta_min})")
    if not lo <= beta <= hi:
        raise ValueError(f"init_beta ({beta}) must lie in [beta_min, beta_max] = [{lo}, {hi}]")
    return lo, hi


CONTROLLERS: dict[str, type[KLController]] = {
    "fixed": FixedKL,
    "adaptive": AdaptiveKL,
    "ppo_penalty": PPOPenaltyKL,
    "pid": PIDKL,
}


def make_controller(kind: str, **params: Any) -> KLController:
    """Build a controller from a config: ``make_controller("adaptive", init_beta=0.1, ...)``.

    Raises a ``ValueError`` naming an unknown ``kind`` or parameter and listing the valid ones.
    """
    try:
        cls = CONTROLLERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown KL controller {kind!r}; expected one of {list(CONTROLLERS)}"
        ) from None
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for KL controller {kind!r}; accepted: {accepted}"
        )
    return cls(**params)
