"""Advantage estimators: GAE with a critic, and critic-free group baselines (GRPO, RLOO).

Shapes: ``B`` sequences (or environments), ``T`` time steps (tokens), ``G`` samples per prompt.
Everything is computed in ≥ fp32 and is pure: tensors in, tensors out, nothing saved for autograd
(advantages and returns are targets, never differentiated through).

* :func:`gae_recursion`: generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438
  eq. 16), δ_t = r_t + γ·b_t·V'_t − V_t and A_t = δ_t + γλ·c_t·A_{t+1}, with separate switches for
  bootstrapping (``b_t``: the next state's value counts) and chaining (``c_t``: step t+1 belongs to
  the same trajectory), so time-limit truncation (bootstrap, but do not chain across the reset) and
  termination (neither) are both exact. Control tasks call it directly.
* :func:`gae`: the language-model layout: one episode per row, the steps are the response tokens
  (``mask``), the episode ends after the last one (its next value is 0). Ziegler et al. 2019,
  arXiv:1909.08593; Ouyang et al. 2022.
* :func:`group_relative`: GRPO's outcome advantage (r − mean_G)/std_G per prompt group (Shao et al.
  2024, arXiv:2402.03300 §4.1.2); ``scale=False`` is Dr. GRPO's unscaled variant (Liu et al. 2025,
  arXiv:2503.20783).
* :func:`leave_one_out`: RLOO's baseline, each sample's reward minus the mean of the other G − 1 in
  its group (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740 eq. 7).

Both group baselines take an optional ``valid`` mask (B,) for samples whose reward was not finite
and that a trainer skips (``reward_on_invalid=skip``): the group statistics are then those of the
n ≤ G valid members only (TRL's nan-aware mean/std), a skipped member's advantage is 0, and a
group with fewer than two valid members has advantage 0 throughout (one sample has no spread to
scale by and no other sample to be a baseline; none has nothing to learn from). A group whose
members are all valid gets exactly (bit for bit) the advantages it gets without a mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tether.core.masked import masked_whiten


def _f(x: Tensor) -> Tensor:
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)


@torch.no_grad()
def gae_recursion(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    bootstrap: Tensor,
    chain: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """GAE along the last dimension, in its general form.

    Args:
        rewards: (..., T) r_t.
        values: (..., T) V(s_t).
        next_values: (..., T) V(s_{t+1}) (for a truncated step: the value of the true next state).
        bootstrap: (..., T) bool, True where V(s_{t+1}) enters δ_t (False at termination).
        chain: (..., T) bool, True where step t+1 continues the same trajectory (False at any
            episode end, terminated or truncated, and at the last step of the rollout).
        gamma: discount γ ∈ [0, 1].
        lam: GAE λ ∈ [0, 1].

    Returns:
        ``(advantages, returns)``, each (..., T) in ≥ fp32; returns = advantages + values (the
        λ-return targets of the critic).
    """
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    shapes = {tuple(t.shape) for t in (rewards, values, next_values, bootstrap, chain)}
    if len(shapes) != 1:
        raise ValueError(
            f"rewards, values, next_values, bootstrap, chain differ in shape: {shapes}"
        )
    r, v, nv = _f(rewards), _f(values), _f(next_values)
    delta = r + gamma * bootstrap.to(r.dtype) * nv - v  # (..., T)
    decay = gamma * lam * chain.to(r.dtype)  # (..., T)
    adv = torch.zeros_like(r)
    running = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        running = delta[..., t] + decay[..., t] * running
        adv[..., t] = running
    return adv, adv + v


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """GAE for token-level episodes: each row is one episode over its ``mask`` positions.

    The masked positions of a row are its consecutive steps (gaps are skipped: the step after t is
    the next masked position); the episode terminates after the last one. Outside the mask both
    outputs are 0.

    Args:
        rewards: (B, T) per-token rewards (e.g. −β·KL_t, plus the score on the last token).
        values: (B, T) critic values V(prefix up to t).
        mask: (B, T) bool, True on the response tokens (the actions).
        gamma: discount (1.0 is standard for RLHF).
        lam: GAE λ.

    Returns:
        ``(advantages, returns)``, (B, T) float32 (float64 for float64 input), 0 off the mask.
    """
    if rewards.dim() != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"rewards, values and mask must all be (B, T), got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.bool()
    b, t = mask.shape
    # compact each row's masked steps to the left, run the recursion, scatter back
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices  # masked first
    n = mask.sum(-1, keepdim=True)  # (B, 1)
    steps = torch.arange(t, device=mask.device).expand(b, t)
    valid = steps < n  # (B, T) compacted validity
    r = torch.where(valid, _f(rewards).gather(-1, order), 0.0)
    v = torch.where(valid, _f(values).gather(-1, order), 0.0)
    has_next = steps + 1 < n  # (B, T)
    nv = torch.where(has_next, torch.roll(v, -1, dims=-1), 0.0)
    adv_c, ret_c = gae_recursion(r, v, nv, has_next, has_next, gamma, lam)
    adv = torch.zeros_like(r).scatter(-1, order, torch.where(valid, adv_c, 0.0))
    ret = torch.zeros_like(r).scatter(-1, order, torch.where(valid, ret_c, 0.0))
    return adv, ret


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be (B,), got {tuple(scores.shape)}")
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(
            f"{scores.numel()} scores do not split into groups of {group_size} "
            "(consecutive samples of one prompt form a group)"
        )
    return _f(scores).view(-1, group_size)  # (B/G, G)


def _valid_groups(g: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped scores (B/G, G) and a (B,) validity mask → ``(scores with 0 at the invalid
    members, the (B/G, G) mask, the (B/G, 1) number of valid members in g's dtype)``."""
    if valid.dtype != torch.bool or valid.shape != (g.numel(),):
        raise ValueError(
            f"valid must be a (B,) = ({g.numel()},) BoolTensor (True = the sample's reward "
            f"counts), got {valid.dtype} of shape {tuple(valid.shape)}"
        )
    v = valid.to(g.device).view_as(g)  # (B/G, G)
    gz = torch.where(v, g, 0.0)  # a skipped member's score (NaN, inf, anything) never enters
    return gz, v, v.sum(-1, keepdim=True).to(g.dtype)  # (B/G, 1)


@torch.no_grad()
def group_relative(
    scores: Tensor,
    group_size: int,
    scale: bool = True,
    eps: float = 1e-4,
    valid: Tensor | None = None,
) -> Tensor:
    """GRPO advantages: (r_i − mean of its group) / (std of its group + eps).

    Shao et al. 2024, arXiv:2402.03300 §4.1.2: outcome supervision sets Â_{i,t} =
    (r_i − mean(r)) / std(r) for every token t of response i, the advantage of the objective of
    eq. 3.

    With ``valid``, mean and std are those of the group's n valid members,
    mean_v = Σ_{j valid} r_j / n and std_v² = Σ_{j valid} (r_j − mean_v)² / (n − 1) (the same
    Bessel-corrected std as without a mask): the nan-aware statistics of TRL's GRPO trainer.
    A skipped member gets 0; so does every member of a group with n < 2 (the std of one sample
    is undefined, and a lone sample has nothing to be compared with).

    Args:
        scores: (B,) sequence rewards, the G samples of each prompt consecutive; entries where
            ``valid`` is False are ignored (they may be NaN).
        group_size: G ≥ 2 (with G = 1 every advantage is 0).
        scale: divide by the group's standard deviation (Bessel-corrected, as GRPO and TRL do);
            False keeps only the mean baseline (Dr. GRPO).
        eps: added to the std, so a group of equal rewards gives 0, not NaN.
        valid: (B,) bool, True where the sample's reward counts; None: all count.

    Returns:
        (B,) float32 advantages (float64 for float64 scores).
    """
    g = _groups(scores, group_size)  # (B/G, G)
    if valid is None:
        return _group_relative_all(g, scale, eps).reshape(-1)
    gz, v, n = _valid_groups(g, valid)
    everyone = _group_relative_all(gz, scale, eps)  # exact for the all-valid groups
    mean = gz.sum(-1, keepdim=True) / n.clamp(min=1.0)  # (B/G, 1)
    centred = torch.where(v, gz - mean, 0.0)  # (B/G, G)
    if scale:
        var = centred.square().sum(-1, keepdim=True) / (n - 1.0).clamp(min=1.0)
        centred = centred / (var.sqrt() + eps)
    some = torch.where(n >= 2, centred, 0.0)  # fewer than two valid members: 0
    adv = torch.where(v.all(-1, keepdim=True), everyone, some)
    return torch.where(v, adv, 0.0).reshape(-1)


def _group_relative_all(g: Tensor, scale: bool, eps: float) -> Tensor:
    """(B/G, G) → (B/G, G): :func:`group_relative` when every member counts."""
    centred = g - g.mean(-1, keepdim=True)
    if scale and g.shape[-1] > 1:
        centred = centred / (g.std(-1, keepdim=True) + eps)
    return centred


@torch.no_grad()
def leave_one_out(scores: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """RLOO advantages: r_i − (Σ_{j≠i} r_j)/(G − 1) within each group of G ≥ 2.

    Ahmadian et al. 2024, arXiv:2402.14740 eq. 7 (Kool et al. 2019). Equals
    G/(G − 1)·(r_i − mean of the group): an unbiased baseline, since it excludes r_i.

    With ``valid``, the baseline is the mean of the *other valid* members,
    b_i = (Σ_{j valid} r_j − r_i)/(n − 1) with n the group's valid count, i.e. n/(n − 1)·(r_i −
    mean_v). A skipped member gets 0; so does every member of a group with n < 2 (no other
    sample to be the baseline).

    Args:
        scores: (B,) sequence rewards, the G samples of each prompt consecutive; entries where
            ``valid`` is False are ignored (they may be NaN).
        group_size: G ≥ 2.
        valid: (B,) bool, True where the sample's reward counts; None: all count.

    Returns:
        (B,) float32 advantages (float64 for float64 scores).
    """
    if group_size < 2:
        raise ValueError("leave_one_out needs group_size ≥ 2 (the baseline excludes the sample)")
    g = _groups(scores, group_size)  # (B/G, G)
    if valid is None:
        return _leave_one_out_all(g).reshape(-1)
    gz, v, n = _valid_groups(g, valid)
    everyone = _leave_one_out_all(gz)  # exact for the all-valid groups
    others = (gz.sum(-1, keepdim=True) - gz) / (n - 1.0).clamp(min=1.0)  # (B/G, G)
    some = torch.where(n >= 2, gz - others, 0.0)  # fewer than two valid members: 0
    adv = torch.where(v.all(-1, keepdim=True), everyone, some)
    return torch.where(v, adv, 0.0).reshape(-1)


def _leave_one_out_all(g: Tensor) -> Tensor:
    """(B/G, G) → (B/G, G): :func:`leave_one_out` when every member counts."""
    others = (g.sum(-1, keepdim=True) - g) / (g.shape[-1] - 1)
    return g - others


@torch.no_grad()
def whiten_advantages(
    advantages: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Whiten advantages over the masked tokens (zero mean unless ``shift_mean=False``, unit
    variance); 0 off the mask. PPO-for-LMs practice (Ziegler 2019; Huang et al. 2022 "N+
    implementation details of RLHF with PPO"). ``reduce``: a sum over processes, so that the
    statistics are the global batch's (see :func:`tether.core.masked.masked_whiten`)."""
    return masked_whiten(_f(advantages), mask.bool(), shift_mean=shift_mean, reduce=reduce)
