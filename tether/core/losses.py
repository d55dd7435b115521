"""Preference losses as pure functions of per-sequence log-probabilities.

The DPO family (Rafailov et al. 2023, arXiv:2305.18290) optimises reward − β·KL(π_θ‖π_ref) without a
reward model: the optimum of that objective satisfies r(x, y) = β·log(π_θ(y|x)/π_ref(y|x)) + const,
so a Bradley–Terry likelihood of the preferences can be written in the policy's log-ratios. With

    h = (log π_θ(y_w) − log π_θ(y_l)) − (log π_ref(y_w) − log π_ref(y_l))

(chosen y_w, rejected y_l, all per-sequence sums of token log-probs), the losses per pair are:

================  =============================================================================
``sigmoid``       −log σ(β h)                                         DPO, arXiv:2305.18290 eq. 7
``cdpo``          −(1−ε) log σ(β h) − ε log σ(−β h)      conservative DPO, label noise ε (Mitchell
                                                          2023, "A note on DPO with noisy prefs")
``ipo``           (h − 1/(2β))²                                IPO, arXiv:2310.12036 eq. 17 (β = τ)
``robust``        [(1−ε)(−log σ(β h)) − ε(−log σ(−β h))] / (1 − 2ε)     rDPO, arXiv:2403.00409 eq. 9
``hinge``         max(0, 1 − β h)                                      SLiC-HF, arXiv:2305.10425
``chi2po``        −log σ(clip_{2R}[β φ(z_w) − β φ(z_l)]),  φ(z) = z + log z,  z = π_θ/π_ref
                                                                       χPO, arXiv:2407.13399 Alg. 1
================  =============================================================================

For ``sigmoid`` a non-zero ``label_smoothing`` gives exactly ``cdpo``. ``ipo`` is usually applied
to length-normalised (mean per token) log-probs; that choice belongs to the caller, which passes
whatever per-sequence log-probs it wants scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from tether.configs.literals import DPOLossType
from tether.core.kl import k3
from tether.core.masked import Aggregation, aggregate, masked_mean, masked_sum

DPO_LOSS_TYPES: tuple[str, ...] = get_args(DPOLossType)

# χPO evaluates φ(z) = z + log z with z = exp(u); u is capped so exp stays finite in float64 (the
# clip on the reward difference makes anything beyond irrelevant to the loss value).
_CHI2_MAX_LOG_RATIO = 50.0


@dataclass(frozen=True)
class PreferenceLossOutput:
    """Per-pair losses and detached statistics. Shapes (B,)."""

    losses: Tensor
    """(B,) per-pair loss, differentiable; average it (or weight it) yourself."""
    chosen_rewards: Tensor
    """(B,) implicit reward of the chosen response: β·(log π_θ − log π_ref), detached."""
    rejected_rewards: Tensor
    """(B,) implicit reward of the rejected response, detached."""

    @property
    def margins(self) -> Tensor:
        """(B,) chosen − rejected implicit reward."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> Tensor:
        """(B,) 1.0 where the chosen response has the higher implicit reward."""
        return (self.chosen_rewards > self.rejected_rewards).float()


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"per-sequence log-prob tensors must share one shape (B,), got {shapes}")


def chi2_link(log_ratio: Tensor) -> Tensor:
    """χPO's link φ(z) = z + log z at z = π_θ/π_ref = exp(log_ratio), in float64.

    It mixes the χ² link (z) with DPO's KL link (log z): near z = 1 it behaves like 2·log z, for
    large ratios the linear term dominates and penalises over-confidence much harder than log z.
    """
    u = log_ratio.double().clamp(max=_CHI2_MAX_LOG_RATIO)
    return torch.exp(u) + u


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chi2_max_reward: float = 1.0,
) -> PreferenceLossOutput:
    """The DPO-family loss of each preference pair (see the module table).

    Args:
        policy_chosen_logps: (B,) log π_θ(y_w|x), summed (or averaged) over response tokens.
        policy_rejected_logps: (B,) log π_θ(y_l|x).
        ref_chosen_logps: (B,) log π_ref(y_w|x), no grad needed.
        ref_rejected_logps: (B,) log π_ref(y_l|x).
        beta: β > 0, the KL coefficient (for ``ipo``, τ).
        loss_type: one of ``sigmoid | cdpo | ipo | robust | hinge | chi2po``.
        label_smoothing: ε in [0, 0.5), the assumed probability that a label is flipped
            (``sigmoid``/``cdpo``/``robust``).
        chi2_max_reward: R_max of χPO; the reward difference is clipped to ±2·R_max.

    Returns:
        :class:`PreferenceLossOutput` (losses in float32, or float64 for float64 inputs).
    """
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if chi2_max_reward <= 0:
        raise ValueError(f"chi2_max_reward must be > 0, got {chi2_max_reward}")
    acc = torch.float64 if policy_chosen_logps.dtype == torch.float64 else torch.float32
    chosen_ratio = policy_chosen_logps.to(acc) - ref_chosen_logps.to(acc).detach()  # (B,)
    rejected_ratio = policy_rejected_logps.to(acc) - ref_rejected_logps.to(acc).detach()  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    eps = label_smoothing
    if loss_type in ("sigmoid", "cdpo"):
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (
            1.0 - 2.0 * eps
        )
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:  # chi2po
        bound = 2.0 * chi2_max_reward
        diff = beta * (chi2_link(chosen_ratio) - chi2_link(rejected_ratio))
        losses = -F.logsigmoid(diff.clamp(-bound, bound)).to(acc)
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )


def nll_sum(token_logps: Tensor, mask: Tensor) -> Tensor:
    """Σ over the loss positions of −log π(x_t | x_<t), in fp32: the maximum-likelihood
    objective of supervised fine-tuning (Ouyang et al. 2022, arXiv:2203.02155, §3.5: "SFT";
    TRL's ``completion_only_loss``), before its division by the token count.

    Args:
        token_logps: (B, T−1) log-probs of the next tokens (position t holds token t+1's).
        mask: (B, T−1) bool, True where the next token is a loss token.

    Returns:
        A scalar; divided by the number of loss tokens (over the whole step, every process) it
        is the token-mean NLL. A masked position never contributes, even when it holds NaN.
    """
    _check_same_shape(token_logps=token_logps, mask=mask)
    return -masked_sum(token_logps.float(), mask)


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None
) -> PreferenceLossOutput:
    """Reward-model loss −log σ(r_w − r_l − m) (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1).

    Args:
        chosen_rewards: (B,) scalar rewards of the chosen responses (differentiable).
        rejected_rewards: (B,) rewards of the rejected responses.
        margin: optional (B,) or scalar margin m ≥ 0 by which the chosen response should win
            (Llama 2, arXiv:2307.09288 eq. 2); default 0.

    Returns:
        :class:`PreferenceLossOutput` whose ``chosen_rewards``/``rejected_rewards`` are the
        detached model rewards.
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards.float() - rejected_rewards.float()  # (B,)
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    return PreferenceLossOutput(
        losses=-F.logsigmoid(diff),
        chosen_rewards=chosen_rewards.detach().float(),
        rejected_rewards=rejected_rewards.detach().float(),
    )


# ------------------------------------------------------------------------------------------------
# Policy-gradient losses (PPO family) and the critic's loss. Per-token inputs (B, T) with a mask;
# the reduction is an explicit ``aggregation`` (see :func:`tether.core.masked.aggregate`).
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLossOutput:
    """A policy loss and its detached diagnostics (scalars, means over the masked tokens)."""

    loss: Tensor
    """Scalar loss, differentiable."""
    clip_fraction: Tensor
    """Share of tokens where the clipped term was the active one (0 for unclipped losses)."""
    kl_old_new: Tensor
    """KL(π_old‖π_θ) over the tokens, k3 estimate (samples are from π_old): ≥ 0."""
    ratio_mean: Tensor
    """Mean importance ratio ρ = π_θ/π_old."""


def _ppo_stats(
    log_ratio: Tensor, mask: Tensor, clipped: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    lr = log_ratio.detach()
    kl = masked_mean(k3(torch.zeros_like(lr), lr), mask)  # k3 of log ρ: (ρ − 1) − log ρ
    ratio = masked_mean(lr.exp(), mask)
    frac = masked_mean(clipped.float(), mask) if clipped is not None else kl.new_zeros(())
    return frac, kl, ratio


def truncated_importance_weights(
    trainer_logp: Tensor, sampler_logp: Tensor, cap: float, mask: Tensor
) -> Tensor:
    """Truncated importance sampling (TIS) weights between the sampler and the trainer, per token.

    When the tokens are drawn by a different numerical copy of the policy (a bf16 rollout copy,
    an inference engine) than the one whose log-probs the loss uses, the policy gradient is
    off-policy by the ratio π_trainer(x)/π_sampler(x). TIS (Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training"; veRL ``tis_imp_ratio_cap``, TRL's
    ``vllm_importance_sampling_correction`` in token-truncate mode) multiplies each token's
    policy-gradient term by w = min(π_trainer/π_sampler, C), detached: unbiased where the ratio is
    below C, with bounded variance.

    Args:
        trainer_logp: (B, T) log π_old of the sampled tokens from the training forward.
        sampler_logp: (B, T) log-probs of the same tokens under the sampler's distribution.
        cap: C > 0, the truncation.
        mask: (B, T) bool, True on the tokens that count.

    Returns:
        (B, T) float32 weights, 1 off the mask, detached.
    """
    if trainer_logp.shape != sampler_logp.shape or trainer_logp.shape != mask.shape:
        raise ValueError("trainer_logp, sampler_logp and mask must have the same (B, T) shape")
    if not cap > 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    log_w = (trainer_logp.float() - sampler_logp.float()).detach()
    w = log_w.clamp(max=math.log(cap)).exp()
    return torch.where(mask, w, 1.0)


def _check_weights(weights: Tensor, mask: Tensor) -> Tensor:
    if weights.shape != mask.shape:
        raise ValueError(
            f"weights shape {tuple(weights.shape)} does not match the mask's {tuple(mask.shape)}"
        )
    return weights.float().detach()


def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    aggregation: Aggregation = "token_mean",
    denominator: float | Tensor | None = None,
    weights: Tensor | None = None,
) -> PolicyLossOutput:
    """PPO's clipped surrogate, per token: −min(ρ·A, clip(ρ, 1−ε, 1+ε_high)·A).

    Schulman et al. 2017, arXiv:1707.06347 eq. 7; ``clip_eps_high`` > ``clip_eps`` is DAPO's
    "clip-higher" (arXiv:2503.14476 eq. 10). ρ = exp(logp − old_logp) in fp32.

    Args:
        logp: (B, T) log π_θ of the sampled tokens (requires grad).
        old_logp: (B, T) log π_old (the behaviour policy) of the same tokens.
        advantages: (B, T) per-token advantages (broadcast a sequence advantage yourself).
        mask: (B, T) bool, True on the tokens that count.
        clip_eps: ε (lower side, and upper side unless ``clip_eps_high`` is given).
        clip_eps_high: ε_high for the upper side.
        aggregation: ``token_mean`` | ``seq_mean`` | ``seq_sum``.
        denominator: global normaliser for micro-batching (see ``aggregate``).
        weights: optional (B, T) detached per-token weights on the surrogate (e.g.
            :func:`truncated_importance_weights`); the clip statistics ignore them.
    """
    if not logp.shape == old_logp.shape == advantages.shape == mask.shape:
        raise ValueError("logp, old_logp, advantages and mask must have the same (B, T) shape")
    if clip_eps <= 0 or (clip_eps_high is not None and clip_eps_high <= 0):
        raise ValueError("clip_eps (and clip_eps_high) must be > 0")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logp.float() - old_logp.float().detach()  # (B, T)
    ratio = log_ratio.exp()
    adv = advantages.float().detach()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # (B, T)
    if weights is not None:
        per_token = per_token * _check_weights(weights, mask)
    frac, kl, ratio_mean = _ppo_stats(log_ratio, mask, clipped < unclipped)
    return PolicyLossOutput(
        loss=aggregate(per_token, mask, aggregation, denominator),
        clip_fraction=frac,
        kl_old_new=kl,
        ratio_mean=ratio_mean,
    )


def ppo_penalty_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    beta: float,
    aggregation: Aggregation = "token_mean",
    denominator: float | Tensor | None = None,
    weights: Tensor | None = None,
) -> PolicyLossOutput:
    """PPO's KL-penalised surrogate, per token: −ρ·A + β·KL_t(π_old‖π_θ) (arXiv:1707.06347 eq. 8).

    The per-token KL is k3 of log ρ, (ρ − 1) − log ρ, on tokens sampled from π_old: its
    expectation is KL(π_old‖π_θ) and so is the expectation of its gradient (E_old[ρ] = 1 for all
    θ). β is adapted outside, after each update, by :class:`tether.core.controllers.PPOPenaltyKL`.
    """
    if not logp.shape == old_logp.shape == advantages.shape == mask.shape:
        raise ValueError("logp, old_logp, advantages and mask must have the same (B, T) shape")
    if beta < 0:
        raise ValueError(f"beta must be ≥ 0, got {beta}")
    old = old_logp.float().detach()
    log_ratio = logp.float() - old
    kl_t = k3(old, logp.float())  # (B, T): KL(π_old‖π_θ) per token, differentiable in logp
    surrogate = log_ratio.exp() * advantages.float().detach()
    if weights is not None:  # on the policy-gradient term only (TIS), not on the KL(old‖θ)
        surrogate = surrogate * _check_weights(weights, mask)
    per_token = -surrogate + beta * kl_t
    _, kl, ratio_mean = _ppo_stats(log_ratio, mask)
    return PolicyLossOutput(
        loss=aggregate(per_token, mask, aggregation, denominator),
        clip_fraction=kl.new_zeros(()),
        kl_old_new=kl,
        ratio_mean=ratio_mean,
    )


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float | None = 0.2,
    aggregation: Aggregation = "token_mean",
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The critic's loss ½·max((V − R)², (V_clip − R)²), V_clip = old + clip(V − old, ±c).

    Value clipping as in OpenAI baselines' PPO2 and Ziegler et al. 2019's PPO for LMs;
    ``clip_range=None`` gives the plain ½(V − R)².

    Returns:
        ``(loss, clip_fraction)``: the scalar loss and the detached share of tokens where the
        clipped error was the larger one.
    """
    if not values.shape == old_values.shape == returns.shape == mask.shape:
        raise ValueError("values, old_values, returns and mask must have the same (B, T) shape")
    v, ret = values.float(), returns.float().detach()
    err = (v - ret).square()
    if clip_range is None:
        return aggregate(0.5 * err, mask, aggregation, denominator), err.new_zeros(())
    old = old_values.float().detach()
    v_clip = old + (v - old).clamp(-clip_range, clip_range)
    err_clip = (v_clip - ret).square()
    frac = masked_mean((err_clip > err).float().detach(), mask)
    per_token = 0.5 * torch.maximum(err, err_clip)
    return aggregate(per_token, mask, aggregation, denominator), frac
