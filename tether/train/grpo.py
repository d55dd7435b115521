"""Critic-free RL for language models with a KL penalty: GRPO (``tether train grpo``) and RLOO
(``tether train rloo``).

Both sample G completions per prompt and use the group as the baseline, so no value model:

* GRPO (Shao et al. 2024, arXiv:2402.03300 §4.1): advantage (r − mean_G)/std_G of the score
  (``scale_rewards=false``: Dr. GRPO's unscaled mean baseline, arXiv:2503.20783), the same for
  every token of a response; the clipped surrogate; the reference KL in the *loss* by default
  (``kl_in="loss"``, β = 0.04 as in the paper) with the k3 estimator weighted by ρ = π_θ/π_old, so
  its gradient is ∇KL(π_θ‖π_ref) (the paper's plain k3 has the forward-KL gradient; see
  :func:`tether.core.kl.loss_term`).
* RLOO (Ahmadian et al. 2024, arXiv:2402.14740): the KL goes into the sequence reward
  (``kl_in="reward"``: r − β·Σ_t KL_t), advantage = that minus the mean of the other G − 1
  samples' (leave-one-out), the clipped surrogate over the tokens (one epoch = REINFORCE with a
  baseline).

With ``reward_on_invalid=skip`` a group's statistics are those of its valid members only (see
:func:`group_advantages`).

``ppo_epochs`` passes × ``num_mini_batches`` optimizer steps per rollout, as in PPO (μ iterations
in the GRPO paper). β from any controller (fixed / adaptive / PID) on the measured KL.
"""

from __future__ import annotations

import math

import torch

from tether.configs.grpo import GRPOConfig  # the configs live in tether.configs
from tether.configs.grpo import RLOOConfig as RLOOConfig  # re-exported
from tether.core.advantages import group_relative, leave_one_out
from tether.core.losses import ppo_clip_loss
from tether.core.masked import aggregate, masked_mean
from tether.train.distributed import MetricSums
from tether.train.guards import guarded_optimizer_step
from tether.train.rl import (
    Experience,
    RLSession,
    aggregation_denominator,
    kl_loss,
    sequence_rewards,
    tis_weights,
    train_loop,
    update_metrics,
)


def group_advantages(exp: Experience, beta: float, cfg: GRPOConfig) -> torch.Tensor:
    """(N, R) token advantages: the group baseline of the (KL-shaped) sequence reward, broadcast
    over each response.

    Samples skipped for an invalid reward (``exp.valid`` False, ``reward_on_invalid=skip``) take
    no part in their group's statistics: the mean and std (GRPO) or the leave-one-out baseline
    (RLOO) are over the group's valid members only, a skipped sample's advantage is 0, and so is
    every advantage of a group with fewer than two valid members (``valid`` in
    :mod:`tether.core.advantages`). A skipped sample's ``response_mask`` is all False, so it adds
    no loss, no tokens and no sequences to the update's denominators
    (:func:`tether.train.rl.aggregation_denominator`)."""
    seq = sequence_rewards(exp, beta, cfg.kl_in)  # (N,)
    g = cfg.num_generations
    if cfg.algorithm == "rloo":
        adv = leave_one_out(seq, g, valid=exp.valid)  # (N,)
    else:
        adv = group_relative(seq, g, scale=cfg.scale_rewards, valid=exp.valid)  # (N,)
    return torch.where(exp.response_mask, adv[:, None], 0.0)  # (N, R)


def group_update(
    sess: RLSession,
    exp: Experience,
    adv: torch.Tensor,
    beta: float,
    cfg: GRPOConfig,
    step: int,
) -> dict[str, float]:
    """Clipped-surrogate updates over one rollout (+ β·ρ·k in the loss when ``kl_in="loss"``)."""
    module, optimizer, scheduler, acc = (
        sess.module,
        sess.optimizer,
        sess.scheduler,
        sess.accelerator,
    )
    n = exp.size
    fill_old = exp.old_logprobs is None  # one on-policy step: θ_old is the θ of this forward
    if fill_old:
        if cfg.ppo_epochs != 1 or cfg.num_mini_batches != 1:
            raise ValueError("behaviour log-probs are needed for more than one update per rollout")
        exp.old_logprobs = torch.zeros_like(exp.ref_logprobs)
    mb = n // cfg.num_mini_batches
    micro = mb // cfg.gradient_accumulation_steps
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    dist = sess.dist
    sums, local = MetricSums(), {"grad_norm": []}
    steps = 0
    module.train()
    for _ in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=gen).to(exp.input_ids.device)
        for m in range(cfg.num_mini_batches):
            rows = perm[m * mb : (m + 1) * mb]
            denom = aggregation_denominator(cfg.loss_aggregation, exp.response_mask[rows], dist)
            for c in range(cfg.gradient_accumulation_steps):
                idx = rows[c * micro : (c + 1) * micro]
                mask = exp.response_mask[idx]
                with acc.autocast():
                    logp, _, _ = module(**exp.rows(idx), temperature=cfg.temperature)
                    logp = logp.float()
                    if fill_old:
                        exp.old_logprobs[idx] = torch.where(mask, logp.detach(), 0.0)
                    w = tis_weights(exp, idx, cfg.tis_cap)
                    pg = ppo_clip_loss(
                        logp,
                        exp.old_logprobs[idx],
                        adv[idx],
                        mask,
                        cfg.clip_eps,
                        cfg.clip_eps_high,
                        cfg.loss_aggregation,
                        denom,
                        weights=w,
                    )
                    loss = pg.loss
                    if cfg.kl_in == "loss" and beta > 0:
                        kl_t = kl_loss(
                            logp,
                            exp.ref_logprobs[idx],
                            exp.old_logprobs[idx],
                            cfg.kl_estimator,
                            mask,
                            None if exp.kl_logprobs is None else exp.kl_logprobs[idx],
                        )
                        loss = loss + beta * aggregate(kl_t, mask, cfg.loss_aggregation, denom)
                acc.backward(loss * dist.grad_scale)
                tokens = mask.sum()
                sums.total("loss/policy", pg.loss.detach())
                for k, v in (
                    ("clip_fraction", pg.clip_fraction),
                    ("kl_old_new", pg.kl_old_new),
                    ("ratio", pg.ratio_mean),
                ):
                    sums.mean(k, v.detach(), tokens)
                if w is not None:
                    sums.mean("tis/weight", masked_mean(w, mask), tokens)
            gn = guarded_optimizer_step(
                acc, module, optimizer, scheduler, cfg.max_grad_norm, sess.guard, loss.detach()
            )
            if gn is not None and math.isfinite(gn):
                local["grad_norm"].append(gn)
            steps += 1
    return update_metrics(sums, dist, steps, ("loss/policy",), local)


def train(cfg: GRPOConfig) -> dict[str, float]:
    """Run GRPO (or RLOO for an :class:`RLOOConfig`); returns the final metrics."""

    def update(sess: RLSession, exp: Experience, beta: float, step: int) -> dict[str, float]:
        return group_update(sess, exp, group_advantages(exp, beta, cfg), beta, cfg, step)

    return train_loop(
        cfg,
        update,
        optimizer_steps_per_iteration=cfg.ppo_epochs * cfg.num_mini_batches,
        behaviour_logprobs=cfg.needs_behaviour_forward,
    )
