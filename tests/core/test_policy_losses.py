"""PPO clip / penalty and value losses: hand values, gradients, masks."""

import math

import pytest
import torch

from tether.core.losses import ppo_clip_loss, ppo_penalty_loss, value_loss


def _one(log_ratio, adv, **kw):
    logp = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    out = ppo_clip_loss(logp, old, torch.tensor([[adv]]), torch.ones(1, 1, dtype=torch.bool), **kw)
    out.loss.backward()
    return out, logp.grad.item()


def test_clip_hand_values():
    # ρ = 1.5, A = +1, ε = .2: the clipped term 1.2 is the min, no gradient
    out, g = _one(math.log(1.5), 1.0)
    assert out.loss.item() == pytest.approx(-1.2) and g == 0.0
    assert out.clip_fraction.item() == 1.0
    # ρ = 1.5, A = −1: −min(−1.5, −1.2) = 1.5, gradient −A·ρ = 1.5 (d/dlogp)
    out, g = _one(math.log(1.5), -1.0)
    assert out.loss.item() == pytest.approx(1.5) and g == pytest.approx(1.5)
    assert out.clip_fraction.item() == 0.0
    # ρ = 1: loss −A, gradient −A, KL(old‖new) 0
    out, g = _one(0.0, 2.0)
    assert out.loss.item() == pytest.approx(-2.0) and g == pytest.approx(-2.0)
    assert out.kl_old_new.item() == 0.0 and out.ratio_mean.item() == pytest.approx(1.0)
    # clip-higher: ε_high = .28 lets ρ = 1.25 through with A > 0
    out, g = _one(math.log(1.25), 1.0, clip_eps_high=0.28)
    assert out.loss.item() == pytest.approx(-1.25) and g == pytest.approx(-1.25)


def test_clip_stats_and_masking():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 9.0]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    m = torch.tensor([[True, True, True, False]])  # the wild ρ = 9 is padding
    out = ppo_clip_loss(logp, old, adv, m)
    # per token −min(ρA, clip ρ·A): [−1.2, −.5, −1], token mean −.9
    assert out.loss.item() == pytest.approx(-2.7 / 3)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.0)]
    assert out.kl_old_new.item() == pytest.approx(sum(k3) / 3, rel=1e-5)
    assert out.ratio_mean.item() == pytest.approx(1.0)


def test_penalty_value_and_gradient():
    r = 1.3
    logp = torch.tensor([[math.log(r)]], dtype=torch.float64, requires_grad=True)
    out = ppo_penalty_loss(
        logp, torch.zeros(1, 1), torch.tensor([[2.0]]), torch.ones(1, 1, dtype=torch.bool), beta=0.5
    )
    want = -r * 2.0 + 0.5 * ((r - 1) - math.log(r))
    assert out.loss.item() == pytest.approx(want)
    out.loss.backward()
    # d/dlogp: −ρA + β(ρ − 1)
    assert logp.grad.item() == pytest.approx(-r * 2.0 + 0.5 * (r - 1))
    with pytest.raises(ValueError, match="beta"):
        ppo_penalty_loss(logp, logp, logp, torch.ones(1, 1, dtype=torch.bool), beta=-1)


def test_value_loss_clipping():
    v = torch.tensor([[1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[0.0, 1.0]])
    m = torch.ones(1, 2, dtype=torch.bool)
    loss, frac = value_loss(v, old, ret, m, clip_range=0.2)
    # token 0: err 1, clipped V = .2 → .04: max 1 → .5; token 1: err 1, clipped 0 → err 1: .5
    assert loss.item() == pytest.approx(0.5) and frac.item() == 0.0
    plain, _ = value_loss(v, old, ret, m, clip_range=None)
    assert plain.item() == pytest.approx(0.5)
    v2 = torch.tensor([[0.5]], requires_grad=True)  # moves away from the target beyond the clip
    loss, frac = value_loss(v2, torch.tensor([[1.0]]), torch.tensor([[1.2]]), m[:, :1], 0.2)
    # err (.5−1.2)² = .49; clipped V = .8 → .16: max .49 → .245
    assert loss.item() == pytest.approx(0.245) and frac.item() == 0.0
    # V jumps from 0 to .9 towards R = 1: the clipped V = .2 has the larger error (.64)
    v3 = torch.tensor([[0.9]], requires_grad=True)
    loss, frac = value_loss(v3, torch.tensor([[0.0]]), torch.tensor([[1.0]]), m[:, :1], 0.2)
    assert loss.item() == pytest.approx(0.5 * 0.64) and frac.item() == 1.0
    loss.backward()
    assert v3.grad.item() == 0.0  # the clipped branch is active: no gradient
