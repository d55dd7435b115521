"""β controllers: hand-computed updates, a simulated plant, validation, exact resume."""

import json
import math
import random

import pytest

from tether.core.controllers import (
    CONTROLLERS,
    PIDKL,
    AdaptiveKL,
    FixedKL,
    PPOPenaltyKL,
    make_controller,
)

# --------------------------------------------------------------------------------------------
# Hand-computed updates
# --------------------------------------------------------------------------------------------


def test_fixed():
    c = FixedKL(0.05)
    assert c.update(100.0, 64) == 0.05
    assert c.update(0.0) == 0.05
    assert FixedKL(0.0).beta == 0.0  # β = 0 is a legitimate "no penalty" baseline


def test_adaptive_ziegler_rule():
    c = AdaptiveKL(init_beta=0.1, target=6.0, horizon=10_000)
    # KL 9 → error clipped to +0.2; 256 samples → β·(1 + 0.2·256/10000)
    assert c.update(9.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 0.0256), rel=1e-15)
    b = c.beta
    # KL 5.4 → error −0.1 (inside the clip)
    assert c.update(5.4, 512) == pytest.approx(b * (1 - 0.1 * 0.0512), rel=1e-12)
    b = c.beta
    assert c.update(0.0, 100) == pytest.approx(b * (1 - 0.2 * 0.01), rel=1e-15)  # clipped at −0.2
    assert c.update(6.0, 100) == pytest.approx(b * (1 - 0.2 * 0.01), rel=1e-15)  # on target: same


def test_adaptive_bounds():
    c = AdaptiveKL(init_beta=0.1, target=1.0, horizon=1.0, beta_max=0.15)
    assert c.update(10.0, 1) == pytest.approx(0.12)
    assert c.update(10.0, 1) == pytest.approx(0.144)
    assert c.update(10.0, 1) == 0.15


def test_ppo_penalty_rule():
    c = PPOPenaltyKL(init_beta=1.0, target=0.01)
    assert c.update(0.02) == 2.0  # > 1.5·target → double
    assert c.update(0.012) == 2.0  # inside [target/1.5, 1.5·target] → unchanged
    assert c.update(0.0066) == 1.0  # < target/1.5 → halve
    assert c.update(0.015) == 1.0  # exactly at the band edge → unchanged
    c2 = PPOPenaltyKL(init_beta=1.0, target=0.01, tolerance=1.2, factor=1.5)
    assert c2.update(0.0125) == 1.5


def test_pid_hand_values():
    c = PIDKL(target=2.0, kp=0.5, ki=0.1, kd=0.2, init_beta=0.3, beta_max=5.0)
    assert c.beta == 0.3
    # step 1: KL 3 → e = 0.5; I = 0.3 + 0.1·0.5 = 0.35; no derivative yet; β = 0.25 + 0.35
    assert c.update(3.0) == pytest.approx(0.6)
    # step 2: KL 4 → e = 1; I = 0.45; rise (4−3)/2 = 0.5; β = 0.5 + 0.45 + 0.1
    assert c.update(4.0) == pytest.approx(1.05)
    # step 3: KL 1 → e = −0.5; I = 0.4; falling KL: no derivative; β = −0.25 + 0.4
    assert c.update(1.0) == pytest.approx(0.15)
    # step 4: KL 0 → e = −1; I = 0.3; β = −0.5 + 0.3 < 0 → clipped to 0
    assert c.update(0.0) == 0.0
    assert c.integral == pytest.approx(0.3)


def test_pid_integral_anti_windup():
    c = PIDKL(target=1.0, kp=0.0, ki=1.0, kd=0.0, init_beta=0.5, beta_max=2.0)
    for _ in range(50):
        c.update(10.0)  # huge violation for a long time
    assert c.beta == 2.0 and c.integral == 2.0  # the integral did not wind up past beta_max
    c.update(0.0)  # the moment the KL drops, β comes down at once
    assert c.beta == pytest.approx(1.0)
    for _ in range(50):
        c.update(0.0)
    assert c.beta == 0.0 and c.integral == 0.0  # never negative, no negative wind-up either
    c.update(2.0)
    assert c.beta == pytest.approx(1.0)


def test_pid_smoothing():
    c = PIDKL(target=1.0, kp=1.0, ki=0.0, kd=0.0, init_beta=0.0, smoothing=0.5)
    c.update(3.0)  # first observation seeds the average: e = 2
    assert c.beta == pytest.approx(2.0)
    c.update(1.0)  # smoothed 2 → e = 1
    assert c.beta == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# A simulated plant: the KL responds to β
# --------------------------------------------------------------------------------------------


class GaussianPlant:
    """A Gaussian policy N(μ, 1) against the reference N(0, 1) with reward r·a.

    The KL-regularised optimum of r·μ − β·μ²/2 is μ* = r/β, so KL*(β) = r²/(2β²): more β, less KL.
    The policy moves a fraction ``rate`` of the way to μ* per update (finite learning speed), and
    each observed KL carries 10% multiplicative noise (a finite batch).
    """

    def __init__(self, r=2.0, rate=0.2, noise=0.1, seed=0):
        self.r, self.rate, self.noise = r, rate, noise
        self.mu = 0.0
        self.rng = random.Random(seed)

    def step(self, beta: float) -> float:
        mu_star = self.r / max(beta, 1e-6)
        self.mu += self.rate * (mu_star - self.mu)
        return max(0.0, self.mu**2 / 2 * (1 + self.noise * self.rng.gauss(0.0, 1.0)))


TARGET = 6.0  # nats, Ziegler et al.'s sentiment target


@pytest.mark.parametrize(
    "make, steps, n_steps",
    [
        (lambda: AdaptiveKL(init_beta=0.05, target=TARGET, horizon=10_000), 1500, 256),
        (lambda: PPOPenaltyKL(init_beta=0.05, target=TARGET), 400, 1),
        (lambda: PIDKL(target=TARGET, init_beta=0.05), 400, 1),
        (lambda: PIDKL(target=TARGET, kd=0.05, smoothing=0.5, init_beta=2.0), 400, 1),
    ],
    ids=["adaptive", "ppo_penalty", "pid", "pid_smoothed_from_above"],
)
def test_controller_holds_kl_near_target(make, steps, n_steps):
    ctrl, plant = make(), GaussianPlant()
    kls = []
    for _ in range(steps):
        kl = plant.step(ctrl.beta)
        kls.append(kl)
        ctrl.update(kl, n_steps)
    first = sum(kls[:10]) / 10
    tail = sum(kls[-100:]) / 100
    assert abs(first - TARGET) > 0.5 * TARGET  # it really started far off the target
    assert abs(tail - TARGET) < 0.2 * TARGET, (tail, ctrl.beta)


def test_fixed_beta_does_not_track_the_target():
    """Control: the same plant with a fixed β ends far from the target, so the test above bites."""
    ctrl, plant = FixedKL(0.05), GaussianPlant()
    kls = [plant.step(ctrl.beta) for _ in range(400)]
    assert sum(kls[-100:]) / 100 > 10 * TARGET


@pytest.mark.parametrize("kind", ["adaptive", "ppo_penalty", "pid"])
def test_beta_moves_in_the_right_direction(kind):
    params = {
        "adaptive": dict(init_beta=1.0, target=1.0, horizon=100),
        "ppo_penalty": dict(init_beta=1.0, target=1.0),
        "pid": dict(target=1.0, init_beta=1.0),
    }[kind]
    up, down = make_controller(kind, **params), make_controller(kind, **params)
    assert up.update(3.0, 10) > 1.0
    assert down.update(0.1, 10) < 1.0


# --------------------------------------------------------------------------------------------
# Validation and state
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, param",
    [
        (lambda: AdaptiveKL(init_beta=0.1, target=0.0, horizon=10), "target"),
        (lambda: AdaptiveKL(init_beta=0.1, target=-1.0, horizon=10), "target"),
        (lambda: AdaptiveKL(init_beta=-0.1, target=1.0, horizon=10), "init_beta"),
        (lambda: AdaptiveKL(init_beta=0.0, target=1.0, horizon=10), "init_beta"),
        (lambda: AdaptiveKL(init_beta=0.1, target=1.0, horizon=0), "horizon"),
        (lambda: AdaptiveKL(init_beta=0.1, target=1.0, horizon=10, beta_max=0.01), "init_beta"),
        (lambda: FixedKL(-1.0), "init_beta"),
        (lambda: FixedKL(float("nan")), "init_beta"),
        (lambda: PPOPenaltyKL(init_beta=1.0, target=0.0), "target"),
        (lambda: PPOPenaltyKL(init_beta=1.0, target=0.01, tolerance=0.9), "tolerance"),
        (lambda: PPOPenaltyKL(init_beta=1.0, target=0.01, factor=1.0), "factor"),
        (lambda: PIDKL(target=0.0), "target"),
        (lambda: PIDKL(target=1.0, kp=-1.0), "kp"),
        (lambda: PIDKL(target=1.0, ki=float("inf")), "ki"),
        (lambda: PIDKL(target=1.0, init_beta=20.0, beta_max=10.0), "init_beta"),
        (lambda: PIDKL(target=1.0, smoothing=1.0), "smoothing"),
        (lambda: make_controller("adaptve", init_beta=1.0), "adaptive"),
        (lambda: make_controller("pid", target=1.0, kq=0.1), "kq"),
    ],
)
def test_invalid_settings_name_the_parameter(factory, param):
    with pytest.raises(ValueError, match=param):
        factory()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, "x"])
@pytest.mark.parametrize("kind", list(CONTROLLERS))
def test_bad_observed_kl_rejected(kind, bad):
    params = {
        "fixed": dict(beta=0.1),
        "adaptive": dict(init_beta=0.1, target=1.0, horizon=10),
        "ppo_penalty": dict(init_beta=0.1, target=1.0),
        "pid": dict(target=1.0),
    }[kind]
    ctrl = make_controller(kind, **params)
    with pytest.raises(ValueError, match="observed_kl"):
        ctrl.update(bad)
    with pytest.raises(ValueError, match="n_steps"):
        ctrl.update(1.0, 0)
    assert ctrl.beta == make_controller(kind, **params).beta  # a rejected update changes nothing


@pytest.mark.parametrize(
    "make",
    [
        lambda: AdaptiveKL(init_beta=0.05, target=TARGET, horizon=2000),
        lambda: PPOPenaltyKL(init_beta=0.05, target=TARGET),
        lambda: PIDKL(target=TARGET, kd=0.1, smoothing=0.3, init_beta=0.05),
    ],
    ids=["adaptive", "ppo_penalty", "pid"],
)
def test_state_dict_round_trip_continues_identically(make):
    ctrl, plant = make(), GaussianPlant(seed=3)
    observed = []
    for _ in range(50):
        kl = plant.step(ctrl.beta)
        observed.append(kl)
        ctrl.update(kl, 64)
    assert make().beta != ctrl.beta  # the state moved, so restoring it is what is tested
    saved = json.loads(json.dumps(ctrl.state_dict()))  # survives serialisation
    resumed = make()
    resumed.load_state_dict(saved)
    assert resumed.beta == ctrl.beta
    rng = random.Random(9)
    for _ in range(50):
        kl = rng.uniform(0, 3 * TARGET)
        assert resumed.update(kl, 64) == ctrl.update(kl, 64)  # bit-identical


def test_load_state_dict_checks_type_and_keys():
    a = AdaptiveKL(init_beta=0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="AdaptiveKL"):
        PIDKL(target=1.0).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="missing keys"):
        PIDKL(target=1.0).load_state_dict({"type": "PIDKL", "beta": 0.1})
    assert math.isfinite(a.beta)
