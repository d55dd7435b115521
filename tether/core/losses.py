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

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

DPOLossType = Literal["sigmoid", "cdpo", "ipo", "robust", "hinge", "chi2po"]
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
