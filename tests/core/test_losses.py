"""DPO-family and Bradley–Terry losses: hand-computed values and gradients for every type."""

import math

import pytest
import torch

from tether.core.losses import (
    DPO_LOSS_TYPES,
    bradley_terry_loss,
    chi2_link,
    dpo_loss,
)


def _pair(chosen_ratio, rejected_ratio, dtype=torch.float64):
    """Policy/ref log-probs with the given per-sequence log-ratios (ref fixed at −10 and −12)."""
    ref_c = torch.tensor([-10.0], dtype=dtype)
    ref_r = torch.tensor([-12.0], dtype=dtype)
    pol_c = (ref_c + chosen_ratio).requires_grad_(True)
    pol_r = (ref_r + rejected_ratio).requires_grad_(True)
    return pol_c, pol_r, ref_c, ref_r


def _softplus(x):
    return math.log1p(math.exp(x))


# h = 1, β = 0.1, ε = 0.1: by hand, −log σ(x) = softplus(−x)
#   sigmoid: softplus(−0.1)                               = 0.6443966600735709
#   cdpo:    0.9·softplus(−0.1) + 0.1·softplus(0.1)       = 0.6543966600735709
#   ipo:     (1 − 1/(2·0.1))² = (1 − 5)²                  = 16
#   robust:  (0.9·softplus(−0.1) − 0.1·softplus(0.1))/0.8 = 0.6318966600735709
#   hinge:   max(0, 1 − 0.1)                              = 0.9
#   chi2po (chosen ratio 0.5, rejected −0.5): φ = e^u + u → 2.1487212707, 0.1065306597;
#            β·Δφ = 0.2042190611 (inside ±2) → softplus(−0.2042190611) = 0.5962417942
HAND = {
    "sigmoid": 0.6443966600735709,
    "cdpo": 0.6543966600735709,
    "ipo": 16.0,
    "robust": 0.6318966600735709,
    "hinge": 0.9,
    "chi2po": 0.5962417942,
}


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_hand_computed_values(loss_type):
    pol_c, pol_r, ref_c, ref_r = _pair(0.5, -0.5)
    eps = 0.1 if loss_type in ("cdpo", "robust") else 0.0
    out = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1, loss_type=loss_type, label_smoothing=eps)
    assert out.losses.item() == pytest.approx(HAND[loss_type], abs=1e-9)
    assert out.chosen_rewards.item() == pytest.approx(0.05)
    assert out.rejected_rewards.item() == pytest.approx(-0.05)
    assert out.margins.item() == pytest.approx(0.1)
    assert out.accuracy.item() == 1.0


def test_independent_formulas_agree():
    assert HAND["sigmoid"] == pytest.approx(_softplus(-0.1), abs=1e-15)
    assert HAND["cdpo"] == pytest.approx(0.9 * _softplus(-0.1) + 0.1 * _softplus(0.1), abs=1e-15)
    robust = (0.9 * _softplus(-0.1) - 0.1 * _softplus(0.1)) / 0.8
    assert HAND["robust"] == pytest.approx(robust, abs=1e-15)
    phi = lambda u: math.exp(u) + u  # noqa: E731
    assert HAND["chi2po"] == pytest.approx(_softplus(-0.1 * (phi(0.5) - phi(-0.5))), abs=1e-9)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_gradients_match_hand_derivatives(loss_type):
    """d loss / d log π_θ(y_w), by hand, at h = 1, β = 0.1, ε = 0.1 (chosen ratio .5, rejected −.5).
    For all types d/d log π(y_l) = −d/d log π(y_w) except χPO, whose link is asymmetric."""
    beta, eps = 0.1, (0.1 if loss_type in ("cdpo", "robust") else 0.0)
    pol_c, pol_r, ref_c, ref_r = _pair(0.5, -0.5)
    out = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta, loss_type, label_smoothing=eps)
    out.losses.sum().backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    x = beta * 1.0
    want = {
        "sigmoid": -beta * sig(-x),
        "cdpo": -beta * ((1 - eps) * sig(-x) - eps * sig(x)),
        "ipo": 2 * (1.0 - 1 / (2 * beta)),
        "robust": -beta * ((1 - eps) * sig(-x) + eps * sig(x)) / (1 - 2 * eps),
        "hinge": -beta,
    }
    if loss_type == "chi2po":
        d = beta * ((math.exp(0.5) + 0.5) - (math.exp(-0.5) - 0.5))
        assert pol_c.grad.item() == pytest.approx(-sig(-d) * beta * (math.exp(0.5) + 1), rel=1e-9)
        assert pol_r.grad.item() == pytest.approx(sig(-d) * beta * (math.exp(-0.5) + 1), rel=1e-9)
    else:
        assert pol_c.grad.item() == pytest.approx(want[loss_type], rel=1e-9)
        assert pol_r.grad.item() == pytest.approx(-want[loss_type], rel=1e-9)
    assert ref_c.grad is None  # the reference never gets a gradient


def test_gradcheck_all_types():
    g = torch.Generator().manual_seed(0)
    pc, pr = (torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True) for _ in "ab")
    rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) for _ in "ab")
    for lt in DPO_LOSS_TYPES:
        assert torch.autograd.gradcheck(
            lambda a, b, lt=lt: dpo_loss(a, b, rc, rr, 0.3, lt, label_smoothing=0.05).losses,
            (pc, pr),
        )


def test_cdpo_equals_sigmoid_with_smoothing_and_robust_reduces_to_dpo():
    pc, pr, rc, rr = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).double()
    a = dpo_loss(pc, pr, rc, rr, 0.2, "cdpo", label_smoothing=0.2).losses
    b = dpo_loss(pc, pr, rc, rr, 0.2, "sigmoid", label_smoothing=0.2).losses
    torch.testing.assert_close(a, b)
    c = dpo_loss(pc, pr, rc, rr, 0.2, "robust").losses
    d = dpo_loss(pc, pr, rc, rr, 0.2, "sigmoid").losses
    torch.testing.assert_close(c, d)


def test_chi2po_clip_and_link():
    assert chi2_link(torch.tensor([0.0])).item() == pytest.approx(1.0)
    # a huge chosen ratio: the reward difference is clipped at 2·R_max, gradient vanishes
    pol_c, pol_r, ref_c, ref_r = _pair(30.0, 0.0)
    out = dpo_loss(pol_c, pol_r, ref_c, ref_r, 0.1, "chi2po", chi2_max_reward=1.0)
    assert out.losses.item() == pytest.approx(_softplus(-2.0), abs=1e-12)
    out.losses.sum().backward()
    assert pol_c.grad.item() == 0.0
    huge = dpo_loss(*_pair(500.0, -500.0), 0.1, "chi2po")
    assert torch.isfinite(huge.losses).all()


def test_bradley_terry():
    rc = torch.tensor([2.0, 0.0], requires_grad=True)
    rr = torch.tensor([1.0, 0.5])
    out = bradley_terry_loss(rc, rr)
    torch.testing.assert_close(
        out.losses, torch.tensor([_softplus(-1.0), _softplus(0.5)], dtype=torch.float32)
    )
    assert out.accuracy.tolist() == [1.0, 0.0]
    out.losses.sum().backward()
    torch.testing.assert_close(rc.grad, -torch.sigmoid(-(rc - rr)).detach())
    m = bradley_terry_loss(rc, rr, margin=torch.tensor([1.0, 0.0]))
    assert m.losses[0].item() == pytest.approx(math.log(2.0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=0.0), "beta"),
        (dict(loss_type="kto"), "loss_type"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(loss_type="chi2po", chi2_max_reward=0.0), "chi2_max_reward"),
    ],
)
def test_bad_settings(kwargs, match):
    x = torch.zeros(3)
    args = dict(beta=0.1) | kwargs
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **args)
    with pytest.raises(ValueError, match="share one shape"):
        dpo_loss(x, torch.zeros(2), x, x, 0.1)
