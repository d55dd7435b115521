"""Control-policy distributions against torch.distributions and hand-derived closed forms."""

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, Normal, kl_divergence

from tether.core.distributions import (
    categorical_entropy,
    categorical_kl,
    categorical_log_prob,
    gaussian_entropy,
    gaussian_kl,
    gaussian_log_prob,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_categorical_against_torch_distributions():
    g = _gen()
    lp, lq = (
        torch.randn(7, 5, generator=g, dtype=torch.float64),
        torch.randn(7, 5, generator=g, dtype=torch.float64),
    )
    a = torch.randint(0, 5, (7,), generator=g)
    p, q = Categorical(logits=lp), Categorical(logits=lq)
    torch.testing.assert_close(categorical_log_prob(lp, a), p.log_prob(a), rtol=0, atol=1e-12)
    torch.testing.assert_close(categorical_entropy(lp), p.entropy(), rtol=0, atol=1e-12)
    torch.testing.assert_close(categorical_kl(lp, lq), kl_divergence(p, q), rtol=0, atol=1e-12)
    assert categorical_kl(lp, lp).abs().max() < 1e-12


def test_categorical_hand_values():
    # p = (½, ½), q = (¼, ¾): KL = ½ log 2 + ½ log(2/3)
    lp = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    lq = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert categorical_kl(lp, lq).item() == pytest.approx(expected, abs=1e-14)
    assert categorical_entropy(lp).item() == pytest.approx(math.log(2.0), abs=1e-14)


@pytest.mark.parametrize("shared_std", [True, False])
def test_gaussian_against_torch_distributions(shared_std):
    g = _gen(1)
    b, d = 6, 3
    mp, mq = (
        torch.randn(b, d, generator=g, dtype=torch.float64),
        torch.randn(b, d, generator=g, dtype=torch.float64),
    )
    shape = (d,) if shared_std else (b, d)
    sp = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    sq = 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    a = torch.randn(b, d, generator=g, dtype=torch.float64)
    p = Independent(Normal(mp, sp.exp().expand(b, d)), 1)
    q = Independent(Normal(mq, sq.exp().expand(b, d)), 1)
    torch.testing.assert_close(gaussian_log_prob(mp, sp, a), p.log_prob(a), rtol=0, atol=1e-12)
    torch.testing.assert_close(gaussian_kl(mp, sp, mq, sq), kl_divergence(p, q), rtol=0, atol=1e-12)
    ent = gaussian_entropy(sp, (b,) if shared_std else None)
    torch.testing.assert_close(ent, p.entropy(), rtol=0, atol=1e-12)


def test_gaussian_kl_hand_value():
    # 1-D: KL(N(0,1) ‖ N(1, 2²)) = log 2 + (1 + 1)/(2·4) − ½
    z = torch.zeros(1, 1, dtype=torch.float64)
    kl = gaussian_kl(z, z[0], z + 1.0, torch.full((1,), math.log(2.0), dtype=torch.float64))
    assert kl.item() == pytest.approx(math.log(2.0) + 2.0 / 8.0 - 0.5, abs=1e-14)


def test_categorical_kl_hessian_is_the_fisher_matrix():
    """∇²_z KL(p_z0 ‖ p_z) at z = z0 equals diag(p) − ppᵀ (the Fisher matrix in logit space)."""
    z0 = torch.tensor([0.3, -1.0, 0.7, 0.1], dtype=torch.float64)

    def kl(z):
        return categorical_kl(z0[None], z[None]).sum()

    h = torch.autograd.functional.hessian(kl, z0.clone())
    p = torch.softmax(z0, -1)
    torch.testing.assert_close(h, torch.diag(p) - torch.outer(p, p), rtol=0, atol=1e-12)
