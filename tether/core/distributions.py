"""Action distributions of control policies: log-probabilities, entropies and exact KLs.

Two families, as in every PPO/TRPO implementation for gymnasium tasks:

* categorical over n actions, parameterised by logits ``(B, n)``;
* diagonal Gaussian over d dimensions, parameterised by a mean ``(B, d)`` and a log standard
  deviation ``(B, d)`` or ``(d,)`` (state-independent, as in Schulman et al. 2015/2017 and SB3).

The KLs are the closed forms (no sampling): categorical KL(p‖q) = Σ_a p_a (log p_a − log q_a);
diagonal Gaussian KL(p‖q) = Σ_i [log σ_q,i − log σ_p,i + (σ_p,i² + (μ_p,i − μ_q,i)²) / (2σ_q,i²)
− ½] (e.g. Bishop 2006 eq. 1.113 per dimension). They are what TRPO's constraint and the
PPO-penalty rule measure, and their Hessians at p = q are the Fisher matrices the conjugate
gradient inverts. Everything is computed in ≥ fp32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def _f(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def categorical_log_prob(logits: Tensor, actions: Tensor) -> Tensor:
    """log π(a | s) for logits (B, n) and integer actions (B,) → (B,)."""
    logp = torch.log_softmax(_f(logits), dim=-1)
    return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)


def categorical_entropy(logits: Tensor) -> Tensor:
    """H(π(· | s)) = −Σ_a p_a log p_a for logits (B, n) → (B,)."""
    logp = torch.log_softmax(_f(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def categorical_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p‖q) = Σ_a p_a (log p_a − log q_a) for logits (B, n) each → (B,), exact."""
    lp = torch.log_softmax(_f(logits_p), dim=-1)
    lq = torch.log_softmax(_f(logits_q), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """log N(a; μ, diag σ²) summed over the d dimensions: mean (B, d), log_std (B, d) or (d,),
    actions (B, d) → (B,)."""
    mean, log_std, a = _f(mean), _f(log_std), _f(actions)
    z = (a - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * LOG_2PI).sum(-1)


def gaussian_entropy(log_std: Tensor, batch_shape: tuple[int, ...] | None = None) -> Tensor:
    """H = Σ_i (log σ_i + ½ log 2πe) for log_std (B, d) → (B,), or (d,) → broadcast to
    ``batch_shape`` (a scalar when it is None)."""
    h = (_f(log_std) + 0.5 * (LOG_2PI + 1.0)).sum(-1)
    return h.expand(batch_shape) if batch_shape is not None else h


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """KL(N_p ‖ N_q) for diagonal Gaussians, closed form, summed over d → (B,).

    Means are (B, d); log standard deviations (B, d) or (d,).
    """
    mp, lp, mq, lq = _f(mean_p), _f(log_std_p), _f(mean_q), _f(log_std_q)
    var_ratio = torch.exp(2.0 * (lp - lq))  # σ_p² / σ_q²
    mean_term = (mp - mq).square() * torch.exp(-2.0 * lq)  # (μ_p − μ_q)² / σ_q²
    return (lq - lp + 0.5 * (var_ratio + mean_term) - 0.5).sum(-1)
