"""TRPO's hard KL constraint: conjugate gradient, Fisher-vector products, the KL line search.

Trust Region Policy Optimization (Schulman et al. 2015, arXiv:1502.05477) maximises the surrogate
L(θ) = E[ρ_θ·A] subject to KL(π_old‖π_θ) ≤ δ (eq. 14, the mean KL over visited states — here the
response tokens, or the environment states). Appendix C gives the algorithm implemented here:

1. g = ∇L at θ_old; the natural direction s ≈ F⁻¹g by :func:`conjugate_gradient` (k iterations),
   using only Fisher-vector products F·v (:func:`fisher_vector_product`: the Hessian of the mean
   KL at θ_old, by double back-propagation, plus damping·v);
2. the largest step along s that satisfies the quadratic KL model: β = √(2δ / sᵀFs)
   (:func:`max_step_length`);
3. backtracking (:func:`line_search`): try θ_old + βᵢ·s for βᵢ = β·backtrackⁱ, i = 0..n−1, accept
   the first one whose surrogate improves and whose *measured* KL is ≤ δ; if none does, the
   parameters stay at θ_old.

Parameters are handled as a list of tensors (the trainable ones: with LoRA only the adapters) and
flattened vectors; nothing here knows about models, so the LM trainer and the control trainer
share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat fp32 (or fp64) vector."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def flat_grad(
    output: Tensor,
    params: Sequence[Tensor],
    *,
    retain_graph: bool | None = None,
    create_graph: bool = False,
) -> Tensor:
    """∇ output w.r.t. ``params`` as one flat vector (zeros for parameters it does not touch)."""
    grads = torch.autograd.grad(
        output,
        list(params),
        retain_graph=retain_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g)
            .reshape(-1)
            .to(torch.float64 if p.dtype == torch.float64 else torch.float32)
            for g, p in zip(grads, params, strict=True)
        ]
    )


@torch.no_grad()
def assign_flat(params: Sequence[Tensor], flat: Tensor) -> None:
    """Write a flat vector into ``params`` in place (each cast to its own dtype)."""
    n = sum(p.numel() for p in params)
    if flat.numel() != n:
        raise ValueError(f"flat vector has {flat.numel()} entries, parameters hold {n}")
    offset = 0
    for p in params:
        k = p.numel()
        p.copy_(flat[offset : offset + k].view_as(p).to(p.dtype))
        offset += k


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    iterations: int = 10,
    residual_tol: float = 1e-10,
) -> Tensor:
    """Approximately solve A x = b for symmetric positive-definite A given only x ↦ A x.

    Hestenes & Stiefel 1952; TRPO arXiv:1502.05477 App. C. Starts at x = 0 and stops after
    ``iterations`` steps or when the squared residual falls below ``residual_tol``.

    Args:
        matvec: v (N,) ↦ A v (N,).
        b: (N,) right-hand side.
        iterations: at most this many matrix-vector products.
        residual_tol: stop when ‖r‖² < this.

    Returns:
        x (N,), same dtype as b.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be ≥ 1, got {iterations}")
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r.dot(r)
    for _ in range(iterations):
        if rr < residual_tol:
            break
        ap = matvec(p)
        pap = p.dot(ap)
        if pap <= 0:
            break  # not positive definite along p (numerical): keep what we have
        alpha = rr / pap
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def fisher_vector_product(
    mean_kl: Tensor,
    params: Sequence[Tensor],
    damping: float = 0.1,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Callable[[Tensor], Tensor]:
    """v ↦ (∇²_θ KL̄ + damping·I) v at the current θ, by double back-propagation.

    ``mean_kl`` must be the mean KL(π_old‖π_θ) computed with π_old detached and θ = θ_old, so its
    value and gradient are 0 and its Hessian is the Fisher information matrix of π_θ (averaged
    over the states/tokens): F = E[∇ log π ∇ log πᵀ] (TRPO App. C.1; Martens 2014). The graph of
    ``mean_kl`` is kept for repeated products.

    Args:
        mean_kl: scalar, differentiable w.r.t. ``params``.
        params: the parameters θ (only these span the natural-gradient space).
        damping: Tikhonov damping added to F (conditioning for CG).
        reduce: a sum over processes. With data sharded over processes, each passes its share
            of the global mean (its masked KL sum over the *global* token count); the Hessian-
            vector products are summed, then the damping is added once.

    Returns:
        A function v (N,) ↦ F v + damping·v (N,).
    """
    if damping < 0:
        raise ValueError(f"damping must be ≥ 0, got {damping}")
    grad = flat_grad(mean_kl, params, retain_graph=True, create_graph=True)  # (N,)

    def product(v: Tensor) -> Tensor:
        gv = grad.dot(v.to(grad.dtype).detach())
        hv = flat_grad(gv, params, retain_graph=True)
        if reduce is not None:
            hv = reduce(hv)
        return hv + damping * v

    return product


def max_step_length(direction: Tensor, fisher_direction: Tensor, max_kl: float) -> Tensor:
    """β = √(2δ / sᵀFs): the step along s at which the quadratic KL model ½ β² sᵀFs equals δ."""
    if max_kl <= 0:
        raise ValueError(f"max_kl must be > 0, got {max_kl}")
    shs = direction.dot(fisher_direction).clamp(min=1e-12)
    return torch.sqrt(2.0 * max_kl / shs)


@dataclass(frozen=True)
class LineSearchResult:
    """What the backtracking line search did."""

    accepted: bool
    """Whether a step was taken (else the parameters are back at θ_old)."""
    step_fraction: float
    """βᵢ/β of the accepted step (0.0 when rejected)."""
    backtracks: int
    """Shrinks tried before acceptance (``max_backtracks`` when rejected)."""
    kl: float
    """Measured KL(π_old‖π_new) at the accepted step (at the last try when rejected)."""
    improvement: float
    """Surrogate(new) − surrogate(old) at the accepted step (at the last try when rejected)."""
    expected_improvement: float
    """First-order prediction gᵀ(β s) of the improvement for the full step."""


@torch.no_grad()
def line_search(
    params: Sequence[Tensor],
    full_step: Tensor,
    evaluate: Callable[[], tuple[float, float]],
    surrogate_old: float,
    max_kl: float,
    expected_improvement: float,
    backtrack: float = 0.8,
    max_backtracks: int = 10,
) -> LineSearchResult:
    """Backtracking search along ``full_step`` from the current parameters, KL-constrained.

    For i = 0 … ``max_backtracks``−1 the parameters are set to θ_old + backtrackⁱ·full_step and
    ``evaluate()`` returns (surrogate, KL(π_old‖π_new)) there. The first try with a surrogate
    strictly above ``surrogate_old`` and KL ≤ ``max_kl`` is kept. Otherwise θ_old is restored
    (exactly: the old values are copied back, not re-derived).

    Args:
        params: the parameters, currently at θ_old; modified in place.
        full_step: (N,) flat step β·s.
        evaluate: () ↦ (surrogate, kl) at the parameters as they are now set.
        surrogate_old: the surrogate at θ_old.
        max_kl: δ.
        expected_improvement: gᵀ·full_step, reported (and used for nothing else).
        backtrack: shrink factor per try, in (0, 1).
        max_backtracks: number of tries.
    """
    if not 0.0 < backtrack < 1.0:
        raise ValueError(f"backtrack must be in (0, 1), got {backtrack}")
    if max_backtracks < 1:
        raise ValueError(f"max_backtracks must be ≥ 1, got {max_backtracks}")
    old = [p.detach().clone() for p in params]
    theta_old = flatten(old)
    kl, improvement = float("nan"), float("nan")
    for i in range(max_backtracks):
        frac = backtrack**i
        assign_flat(params, theta_old + frac * full_step.to(theta_old.dtype))
        surrogate, kl = evaluate()
        improvement = surrogate - surrogate_old
        if improvement > 0 and kl <= max_kl:
            return LineSearchResult(True, frac, i, kl, improvement, expected_improvement)
    for p, o in zip(params, old, strict=True):
        p.copy_(o)
    return LineSearchResult(False, 0.0, max_backtracks, kl, improvement, expected_improvement)
