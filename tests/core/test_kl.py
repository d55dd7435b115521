"""KL estimators and exact KL: closed forms, Schulman's bias/variance table, gradient semantics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.alloc import AllocationRecorder
from tether.core import kl

# --------------------------------------------------------------------------------------------
# Sampled-token estimators: hand values and properties
# --------------------------------------------------------------------------------------------


def test_hand_values():
    logp = torch.tensor([-1.0, -0.5, -2.0])
    ref = torch.tensor([-2.0, -0.5, -1.0])
    # log r = ref − logp = [−1, 0, 1]
    torch.testing.assert_close(kl.k1(logp, ref), torch.tensor([1.0, 0.0, -1.0]))
    torch.testing.assert_close(kl.k2(logp, ref), torch.tensor([0.5, 0.0, 0.5]))
    e = math.e
    torch.testing.assert_close(kl.k3(logp, ref), torch.tensor([1 / e, 0.0, e - 2.0]))
    torch.testing.assert_close(kl.absolute(logp, ref), torch.tensor([1.0, 0.0, 1.0]))
    for name in kl.ESTIMATORS:
        torch.testing.assert_close(kl.estimate(logp, ref, name), kl._ESTIMATOR_FNS[name](logp, ref))


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "abs"])
def test_zero_when_equal_and_fp32_output(name):
    logp = torch.randn(4, 7, dtype=torch.bfloat16) - 3
    out = kl.estimate(logp, logp.clone(), name)
    assert out.shape == (4, 7)
    assert out.dtype == torch.float32
    assert (out == 0).all()


@settings(max_examples=300, deadline=None)
@given(
    a=st.floats(-30, 0, allow_nan=False, width=32),
    b=st.floats(-30, 0, allow_nan=False, width=32),
)
def test_k2_k3_abs_nonnegative(a, b):
    for dtype in (torch.float32, torch.bfloat16):
        lp, lq = torch.tensor([a], dtype=dtype), torch.tensor([b], dtype=dtype)
        assert kl.k2(lp, lq).item() >= 0
        assert kl.k3(lp, lq).item() >= 0
        assert kl.absolute(lp, lq).item() >= 0


def test_k3_precise_for_tiny_ratios():
    """Near the reference, (r−1)−log r cancels catastrophically in fp32; the series does not."""
    log_r = torch.tensor([1e-6, -3e-5, 2e-4, -5e-3, 0.011, 0.099, -0.11, -0.3, 2.0])
    logp = torch.zeros_like(log_r)
    got = kl.k3(logp, log_r)
    x = log_r.double()
    expected = torch.expm1(x) - x
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=0.0)
    assert (got > 0).all()


def test_bad_estimator_and_shapes():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl.estimate(a, a, "k4")
    with pytest.raises(ValueError, match="ref_logp shape"):
        kl.k1(a, torch.zeros(4))
    with pytest.raises(ValueError, match="'k1' or 'k3'"):
        kl.loss_term(a, a, "k2")
    with pytest.raises(ValueError, match="behaviour_logp shape"):
        kl.loss_term(a, a, "k3", behaviour_logp=torch.zeros(2))


# --------------------------------------------------------------------------------------------
# Monte Carlo: Schulman's "Approximating KL divergence" table, against closed forms
# --------------------------------------------------------------------------------------------


def _gaussian_kl(mu1, s1, mu2, s2):
    """KL(N(mu1, s1²) ‖ N(mu2, s2²)), closed form."""
    return math.log(s2 / s1) + (s1**2 + (mu1 - mu2) ** 2) / (2 * s2**2) - 0.5


def _normal_logpdf(x, mu, s):
    return -0.5 * ((x - mu) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)


@pytest.mark.parametrize("mu", [0.1, 1.0])
def test_schulman_bias_variance_table(mu):
    """q = N(0,1) samples (the policy), p = N(mu,1) (the reference). True KL(q‖p) = mu²/2.

    Closed forms (derived in the test's comments) for the mean and std of each estimator:
      log r = mu·x − mu²/2 with x ~ N(0,1)
      k1: mean mu²/2, std mu                          (relative std 2/mu: 20 and 2)
      k2: mean mu²/2 + mu⁴/8, std sqrt((2mu⁴+mu⁶)/4)  (relative bias mu²/4: 0.0025 and 0.25)
      k3: mean mu²/2, std sqrt(e^{mu²} − 1 − mu²)     (relative std 1.42 and 1.70)
    The MC means must sit within 4 standard errors of the closed-form means and the sample stds
    within 5% of the closed-form stds; k2's bias at mu=1 must be many standard errors wide.
    """
    n = 2_000_000
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    logq = _normal_logpdf(x, 0.0, 1.0)
    logp = _normal_logpdf(x, mu, 1.0)
    true_kl = _gaussian_kl(0.0, 1.0, mu, 1.0)
    assert true_kl == pytest.approx(mu**2 / 2)
    closed = {
        "k1": (mu**2 / 2, mu),
        "k2": (mu**2 / 2 + mu**4 / 8, math.sqrt((2 * mu**4 + mu**6) / 4)),
        "k3": (mu**2 / 2, math.sqrt(math.exp(mu**2) - 1 - mu**2)),
    }
    for name, (mean, std) in closed.items():
        k = kl.estimate(logq, logp, name)
        se = std / math.sqrt(n)
        assert abs(k.mean().item() - mean) < 4 * se, (name, k.mean().item(), mean, se)
        assert k.std().item() == pytest.approx(std, rel=0.05), name
    # The pattern of the note: k1 noisy, k3 unbiased with far less variance than k1 at small mu.
    assert closed["k1"][1] / true_kl == pytest.approx(2 / mu)
    if mu == 0.1:
        assert kl.k3(logq, logp).std() < kl.k1(logq, logp).std() / 10
    else:
        bias = kl.k2(logq, logp).mean().item() - true_kl
        assert bias / true_kl == pytest.approx(0.25, rel=0.05)
        assert bias > 50 * closed["k2"][1] / math.sqrt(n)


def test_estimators_unbiased_for_gaussians_with_different_scales():
    n = 1_000_000
    g = torch.Generator().manual_seed(7)
    mu1, s1, mu2, s2 = 0.3, 0.8, -0.2, 1.3
    x = mu1 + s1 * torch.randn(n, generator=g, dtype=torch.float64)
    logq = _normal_logpdf(x, mu1, s1)
    logp = _normal_logpdf(x, mu2, s2)
    true_kl = _gaussian_kl(mu1, s1, mu2, s2)
    for name in ("k1", "k3"):
        k = kl.estimate(logq, logp, name)
        se = k.std().item() / math.sqrt(n)
        assert abs(k.mean().item() - true_kl) < 4 * se, name


# --------------------------------------------------------------------------------------------
# Gradient semantics, by exact enumeration over a categorical policy
# --------------------------------------------------------------------------------------------

V = 6


def _categorical():
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(V, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(V, generator=g, dtype=torch.float64)
    old_logits = theta + 0.5 * torch.randn(V, generator=g, dtype=torch.float64)
    return theta, ref_logits, old_logits


def _exact_kl_grad(theta, ref_logits, direction):
    t = theta.clone().requires_grad_(True)
    lp, lq = F.log_softmax(t, -1), F.log_softmax(ref_logits, -1)
    value = (lp.exp() * (lp - lq)).sum() if direction == "reverse" else (lq.exp() * (lq - lp)).sum()
    (grad,) = torch.autograd.grad(value, t)
    return grad


def _expected_grad(theta, ref_logits, term, sampler_logits=None):
    """E_{x∼sampler}[∇_θ term(x)], exactly: Σ_x sampler(x) ∇_θ term(x), sampler weights fixed."""
    t = theta.clone().requires_grad_(True)
    lp = F.log_softmax(t, -1)  # log π_θ(x) for every x
    lq = F.log_softmax(ref_logits, -1)
    if sampler_logits is None:
        weights = lp.detach().exp()
        values = term(lp, lq, None)
    else:
        lb = F.log_softmax(sampler_logits, -1)
        weights = lb.exp()
        values = term(lp, lq, lb)
    (grad,) = torch.autograd.grad((weights * values).sum(), t)
    return grad


def test_gradient_of_each_estimator_as_a_loss_on_policy():
    theta, ref_logits, _ = _categorical()
    grad_rev = _exact_kl_grad(theta, ref_logits, "reverse")
    grad_fwd = _exact_kl_grad(theta, ref_logits, "forward")
    assert (grad_rev - grad_fwd).norm() > 0.1 * grad_rev.norm()  # the two really differ

    def plain(name):
        return lambda lp, lq, _b: kl.estimate(lp, lq, name)

    g1 = _expected_grad(theta, ref_logits, plain("k1"))
    g2 = _expected_grad(theta, ref_logits, plain("k2"))
    g3 = _expected_grad(theta, ref_logits, plain("k3"))
    gabs = _expected_grad(theta, ref_logits, plain("abs"))
    torch.testing.assert_close(g1, torch.zeros(V, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(g2, grad_rev, atol=1e-12, rtol=1e-10)  # k2: the reverse-KL grad
    torch.testing.assert_close(g3, grad_fwd, atol=1e-12, rtol=1e-10)  # k3: the FORWARD-KL grad
    assert (g3 - grad_rev).norm() > 0.1 * grad_rev.norm()
    assert (gabs - grad_rev).norm() > 0.1 * grad_rev.norm()
    assert (gabs - grad_fwd).norm() > 0.1 * grad_rev.norm()

    # loss_term: k3 and k1 with the importance weight give the reverse-KL gradient.
    for name in ("k3", "k1"):
        g = _expected_grad(theta, ref_logits, lambda lp, lq, _b, n=name: kl.loss_term(lp, lq, n))
        torch.testing.assert_close(g, grad_rev, atol=1e-12, rtol=1e-10)


def test_loss_term_gradient_off_policy():
    """Samples from an older policy (PPO's later epochs): loss_term stays right, k2 does not."""
    theta, ref_logits, old_logits = _categorical()
    grad_rev = _exact_kl_grad(theta, ref_logits, "reverse")
    for name in ("k3", "k1"):
        g = _expected_grad(
            theta,
            ref_logits,
            lambda lp, lq, lb, n=name: kl.loss_term(lp, lq, n, behaviour_logp=lb),
            sampler_logits=old_logits,
        )
        torch.testing.assert_close(g, grad_rev, atol=1e-12, rtol=1e-10)
    g2 = _expected_grad(theta, ref_logits, lambda lp, lq, lb: kl.k2(lp, lq), old_logits)
    assert (g2 - grad_rev).norm() > 0.05 * grad_rev.norm()


def test_loss_term_value_is_unbiased_kl_estimate_off_policy():
    theta, ref_logits, old_logits = _categorical()
    lp, lq, lb = (F.log_softmax(z, -1) for z in (theta, ref_logits, old_logits))
    exact = (lp.exp() * (lp - lq)).sum()
    value = (lb.exp() * kl.loss_term(lp, lq, "k3", behaviour_logp=lb)).sum()
    assert value.item() == pytest.approx(exact.item(), abs=1e-12)


def test_loss_term_monte_carlo_gradient_through_token_gather():
    """Sampled tokens, gathered log-probs, one backward: the mean gradient of loss_term('k3')
    matches ∇KL(π‖ref) within 4 standard errors, and plain k3 misses it by many."""
    theta, ref_logits, _ = _categorical()
    grad_rev = _exact_kl_grad(theta, ref_logits, "reverse")
    n = 400_000
    g = torch.Generator().manual_seed(11)
    probs = F.softmax(theta, -1)
    x = torch.multinomial(probs, n, replacement=True, generator=g)  # (N,) samples from π_θ

    def mc_grad(fn):
        t = theta.clone().requires_grad_(True)
        lp = F.log_softmax(t, -1)[x]  # (N,)
        lq = F.log_softmax(ref_logits, -1)[x]
        (grad,) = torch.autograd.grad(fn(lp, lq).mean(), t)
        # per-sample gradients from the per-outcome jacobian, for the standard error
        t2 = theta.clone().requires_grad_(True)
        lp_all = F.log_softmax(t2, -1)
        lq_all = F.log_softmax(ref_logits, -1)
        jac = torch.stack(
            [torch.autograd.grad(fn(lp_all, lq_all)[v], t2, retain_graph=True)[0] for v in range(V)]
        )  # (V, V): row v = ∇ term at outcome v
        se = jac[x].std(dim=0) / math.sqrt(n)
        return grad, se

    g_lt, se_lt = mc_grad(lambda lp, lq: kl.loss_term(lp, lq, "k3"))
    assert ((g_lt - grad_rev).abs() < 4 * se_lt + 1e-12).all()
    g_k3, se_k3 = mc_grad(kl.k3)
    assert ((g_k3 - grad_rev).abs() / (se_k3 + 1e-12)).max() > 20


# --------------------------------------------------------------------------------------------
# Exact KL from logits
# --------------------------------------------------------------------------------------------


def _reference_kl(logits, ref_logits, direction):
    lp = F.log_softmax(logits.double(), -1)
    lq = F.log_softmax(ref_logits.double(), -1)
    if direction == "reverse":  # KL(π‖ref): F.kl_div(input=log ref, target=log π)
        return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    return F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 7])
def test_exact_matches_kl_div_values_and_gradients(direction, chunk_size):
    g = torch.Generator().manual_seed(5)
    B, T, Vv = 3, 5, 97
    logits = (2 * torch.randn(B, T, Vv, generator=g)).requires_grad_(True)
    ref_logits = (2 * torch.randn(B, T, Vv, generator=g)).requires_grad_(True)
    mask = torch.rand(B, T, generator=g) > 0.3
    upstream = torch.randn(B, T, generator=g)

    out = kl.exact_from_logits(logits, ref_logits, mask, direction, chunk_size)
    assert out.shape == (B, T) and out.dtype == torch.float32
    (out * upstream).sum().backward()

    z = logits.detach().clone().requires_grad_(True)
    w = ref_logits.detach().clone().requires_grad_(True)
    expected = torch.where(mask, _reference_kl(z, w, direction), 0.0)
    (expected * upstream.double()).sum().backward()

    torch.testing.assert_close(out.double(), expected.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits.grad.double(), z.grad.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_logits.grad.double(), w.grad.double(), atol=1e-5, rtol=0)
    assert (out[~mask] == 0).all()
    assert (logits.grad[~mask] == 0).all()


def test_exact_gradcheck_float64():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    for direction in ("reverse", "forward"):
        assert torch.autograd.gradcheck(
            lambda a, b, d=direction: kl.exact_from_logits(a, b, mask, d, chunk_size=2),
            (logits, ref),
        )


def test_exact_categorical_closed_form_and_self_kl():
    p = np.array([0.5, 0.25, 0.125, 0.125])
    q = np.array([0.1, 0.2, 0.3, 0.4])
    rev = float(np.sum(p * np.log(p / q)))
    fwd = float(np.sum(q * np.log(q / p)))
    lp = torch.tensor(np.log(p)).view(1, 1, 4)
    lq = torch.tensor(np.log(q)).view(1, 1, 4)
    # logits are defined up to a constant: shift them to check softmax invariance too
    assert kl.exact_from_logits(lp + 3.0, lq - 1.0).item() == pytest.approx(rev, abs=1e-12)
    assert kl.exact_from_logits(lp, lq, direction="forward").item() == pytest.approx(fwd, abs=1e-12)
    z = torch.randn(4, 9, 50)
    assert kl.exact_from_logits(z, z.clone()).abs().max().item() < 1e-6


def test_exact_matches_gaussian_closed_form_on_a_fine_grid():
    """Discretised Gaussians on a fine grid: the exact categorical KL → the Gaussian closed form."""
    grid = torch.linspace(-12, 12, 24001, dtype=torch.float64)
    mu1, s1, mu2, s2 = 0.4, 1.1, -0.3, 0.9
    z1 = (-0.5 * ((grid - mu1) / s1) ** 2).view(1, -1)
    z2 = (-0.5 * ((grid - mu2) / s2) ** 2).view(1, -1)
    got = kl.exact_from_logits(z1, z2).item()
    assert got == pytest.approx(_gaussian_kl(mu1, s1, mu2, s2), rel=1e-6)
    got_f = kl.exact_from_logits(z1, z2, direction="forward").item()
    assert got_f == pytest.approx(_gaussian_kl(mu2, s2, mu1, s1), rel=1e-6)


def test_exact_handles_filtered_logits_and_poisoned_padding():
    logits = torch.randn(2, 3, 10)
    logits[..., :4] = float("-inf")  # top-k filtered policy: reverse KL stays finite
    ref = torch.randn(2, 3, 10)
    out = kl.exact_from_logits(logits, ref)
    assert torch.isfinite(out).all()
    expected = _reference_kl(logits[..., 4:], ref[..., 4:], "reverse")
    # with 4 entries removed from π, KL(π‖ref) = Σ_{v≥4} π_v (log π_v − log ref_v)
    lq_full = F.log_softmax(ref.double(), -1)[..., 4:]
    lp_part = F.log_softmax(logits[..., 4:].double(), -1)
    direct = (lp_part.exp() * (lp_part - lq_full)).sum(-1)
    torch.testing.assert_close(out.double(), direct, atol=1e-5, rtol=0)
    assert not torch.allclose(out.double(), expected)  # renormalising ref would be wrong

    z = torch.randn(2, 3, 10, requires_grad=True)
    poisoned = z.detach().clone()
    poisoned[1, 2] = float("nan")
    zp = poisoned.requires_grad_(True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    out = kl.exact_from_logits(zp, ref, mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(zp.grad).all()


def test_exact_bf16_inputs_computed_in_fp32():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 300, generator=g).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(2, 4, 300, generator=g).to(torch.bfloat16)
    out = kl.exact_from_logits(z, w, chunk_size=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), _reference_kl(z.detach(), w, "reverse"), atol=1e-5, rtol=0
    )
    out.sum().backward()
    assert z.grad.dtype == torch.bfloat16


def test_exact_bad_inputs():
    z = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="ref_logits shape"):
        kl.exact_from_logits(z, torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="mask must be a BoolTensor of shape"):
        kl.exact_from_logits(z, z, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="direction"):
        kl.exact_from_logits(z, z, direction="both")
    with pytest.raises(ValueError, match="chunk_size"):
        kl.exact_from_logits(z, z, chunk_size=0)


def test_exact_memory_is_bounded_by_the_chunk():
    """Forward + backward never allocate an (N, V) temporary, only the (N, V) gradient itself."""
    n, vocab, chunk = 64, 512, 8
    z = torch.randn(n, vocab, requires_grad=True)
    w = torch.randn(n, vocab)
    with AllocationRecorder() as rec:
        kl.exact_from_logits(z, w, chunk_size=chunk).sum().backward()
    big = [s for s in rec.sizes if s > chunk * vocab]
    assert big == [n * vocab], big  # exactly one: the gradient buffer
    with AllocationRecorder() as naive:
        _reference_kl(z, w, "reverse").sum().backward()
    assert sum(s >= n * vocab for s in naive.sizes) >= 4  # the naive path holds several


# --------------------------------------------------------------------------------------------
# Best-of-n
# --------------------------------------------------------------------------------------------


def _discrete_bon_kl(n: int, k: int) -> float:
    """Exact KL(best-of-n ‖ base) for a uniform base over k distinct rewards."""
    j = np.arange(1, k + 1, dtype=np.float64)
    p_bon = (j / k) ** n - ((j - 1) / k) ** n
    pos = p_bon > 0  # (j/k)^n underflows for large n: 0·log 0 = 0
    return float(np.sum(p_bon[pos] * np.log(p_bon[pos] * k)))


def test_best_of_n_kl():
    assert kl.best_of_n_kl(1) == 0.0
    assert kl.best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert kl.best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    for n in (2, 4, 16, 64):
        fine = _discrete_bon_kl(n, 200_000)
        assert fine == pytest.approx(kl.best_of_n_kl(n), abs=2e-3)
        assert fine <= kl.best_of_n_kl(n) + 1e-12
        assert _discrete_bon_kl(n, 3) < kl.best_of_n_kl(n) - 1e-3  # ties: strictly an upper bound
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="n must be an integer"):
            kl.best_of_n_kl(bad)
