"""Conjugate gradient, Fisher-vector products (= autograd Hessian of the KL = the Fisher matrix)
and the KL-constrained backtracking line search."""

import torch

from tether.core.trust_region import (
    assign_flat,
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    flatten,
    line_search,
    max_step_length,
)


def test_conjugate_gradient_solves_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=6, residual_tol=0.0)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), atol=1e-8, rtol=0)
    # fewer iterations: an approximation, better than nothing and worse than the solve
    x2 = conjugate_gradient(lambda v: a @ v, b, iterations=2)
    assert 0 < (a @ x2 - b).norm() < b.norm()


def _policy(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    states = torch.randn(5, 3, generator=g, dtype=torch.float64)
    return [w, bias], states


def _logits(params, states):
    w, bias = params
    return states @ w + bias  # (S, A)


def _mean_kl(params, states, old_logp):
    logp = torch.log_softmax(_logits(params, states), -1)
    return (old_logp.exp() * (old_logp - logp)).sum(-1).mean()  # KL(π_old‖π_θ)


def test_fisher_vector_product_equals_kl_hessian_and_fisher():
    params, states = _policy()
    old_logp = torch.log_softmax(_logits(params, states), -1).detach()
    fvp = fisher_vector_product(_mean_kl(params, states, old_logp), params, damping=0.1)
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def kl_of_flat(flat):
        w = flat[:12].view(3, 4)
        b = flat[12:]
        return _mean_kl([w, b], states, old_logp)

    hessian = torch.autograd.functional.hessian(kl_of_flat, flatten(params).detach())
    torch.testing.assert_close(fvp(v), hessian @ v + 0.1 * v, atol=1e-10, rtol=1e-8)
    # and the Fisher matrix E_s E_a∼π [∇log π ∇log πᵀ], built independently
    fisher = torch.zeros(n, n, dtype=torch.float64)
    for s in range(states.shape[0]):
        probs = old_logp[s].exp()
        for a in range(4):
            lp = torch.log_softmax(_logits(params, states[s : s + 1]), -1)[0, a]
            gr = flat_grad(lp, params)
            fisher += probs[a] * torch.outer(gr, gr)
    fisher /= states.shape[0]
    torch.testing.assert_close(fvp(v), fisher @ v + 0.1 * v, atol=1e-10, rtol=1e-8)


def test_max_step_length_meets_the_quadratic_kl_model():
    s = torch.tensor([1.0, 2.0], dtype=torch.float64)
    fs = torch.tensor([2.0, 1.0], dtype=torch.float64)  # sᵀFs = 4
    beta = max_step_length(s, fs, max_kl=0.01)
    assert abs(0.5 * beta.item() ** 2 * 4.0 - 0.01) < 1e-12


def test_line_search_accepts_only_within_the_trust_region_and_restores_otherwise():
    params, states = _policy(seed=3)
    old_logp = torch.log_softmax(_logits(params, states), -1).detach()
    adv = torch.randn(5, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def surrogate():
        logp = torch.log_softmax(_logits(params, states), -1)
        return (old_logp.exp() * (logp - old_logp).exp() * adv).sum(-1).mean()

    def evaluate():
        with torch.no_grad():
            return surrogate().item(), _mean_kl(params, states, old_logp).item()

    theta_old = flatten(params).detach().clone()
    sur_old = surrogate()
    g = flat_grad(sur_old, params)
    fvp = fisher_vector_product(_mean_kl(params, states, old_logp), params, damping=1e-3)
    direction = conjugate_gradient(fvp, g, iterations=10)
    for delta in (1e-3, 1e-2, 5e-2):
        step = max_step_length(direction, fvp(direction), delta) * direction
        res = line_search(params, step, evaluate, sur_old.item(), delta, g.dot(step).item())
        now = evaluate()
        if res.accepted:
            assert now[1] <= delta and now[0] > sur_old.item()
            assert res.kl == now[1] and res.step_fraction == 0.8**res.backtracks
        assign_flat(params, theta_old)
    # a step in the wrong direction is never accepted, and θ_old comes back bit for bit
    res = line_search(params, -10 * direction, evaluate, sur_old.item(), 1e-2, 0.0)
    assert not res.accepted and res.step_fraction == 0.0
    assert torch.equal(flatten(params), theta_old)
