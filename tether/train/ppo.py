"""PPO for language models with a KL penalty to the reference (``tether train ppo``), and PPO with
an adaptive KL penalty instead of clipping (``tether train ppo_penalty``).

Each iteration: a rollout (:func:`tether.train.rl.collect`: B prompts × G samples, behaviour and
reference log-probs, per-token KL, validated rewards, critic values); per-token rewards with the
reference penalty shaped in (``kl_in="reward"``, the default, Ziegler et al. 2019) or kept for the
loss (``kl_in="loss"``); GAE advantages from a value head on the policy's last hidden states
(Schulman et al. 2016), whitened over the response tokens; then ``ppo_epochs`` passes over the
rollout in ``num_mini_batches`` shuffled mini-batches, one optimizer step each:

* ``ppo``: the clipped surrogate (arXiv:1707.06347 eq. 7) + ``vf_coef`` × clipped value loss
  [+ β·ρ·k3 when ``kl_in="loss"``] − ``entropy_coef`` × entropy; optional early stop of the
  epochs when KL(π_old‖π_θ) exceeds 1.5 × ``target_kl`` (as in OpenAI baselines / SB3);
* ``ppo_penalty``: no clipping, the surrogate −ρ·A + β_old·KL(π_old‖π_θ) (eq. 8), with β_old
  adapted after each iteration by PPO's halve/double rule (§4: ``penalty_target`` d_targ,
  tolerance 1.5, factor 2) on the KL(π_old‖π_θ) measured after the update; the β_old trajectory
  is logged as ``penalty_beta``. The reference penalty stays where ``kl_in`` puts it.

After the update the reference-KL controller (fixed / adaptive / PID) sees the measured per-sequence
KL of the rollout and sets β for the next one.
"""

from __future__ import annotations

import math

import torch

from tether.configs.ppo import PPOConfig, PPOPenaltyConfig  # the configs live in tether.configs
from tether.core.advantages import gae, whiten_advantages
from tether.core.controllers import PPOPenaltyKL
from tether.core.kl import k3
from tether.core.losses import ppo_clip_loss, ppo_penalty_loss, value_loss
from tether.core.masked import aggregate, masked_mean, masked_sum
from tether.models.numerics import fp32_policy_logprobs
from tether.train.distributed import Dist, MetricSums
from tether.train.guards import guarded_optimizer_step
from tether.train.rl import (
    Experience,
    RLSession,
    aggregation_denominator,
    full_logprob_mask,
    kl_loss,
    shaped_token_rewards,
    tis_weights,
    train_loop,
    update_metrics,
)


def advantages_and_returns(
    exp: Experience, beta: float, cfg: PPOConfig, dist: Dist | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, R) GAE advantages (whitened if configured, over the response tokens of every process
    with ``dist``) and λ-returns of a rollout."""
    if exp.values is None:
        raise ValueError("PPO needs critic values in the experience")
    rewards = shaped_token_rewards(exp, beta, cfg.kl_in)
    adv, ret = gae(rewards, exp.values, exp.response_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = whiten_advantages(adv, exp.response_mask, reduce=None if dist is None else dist.sum)
    return adv, ret


@torch.no_grad()
def kl_old_new(sess: RLSession, exp: Experience, cfg: PPOConfig) -> float:
    """Mean per-token KL(π_old‖π_θ) (k3) over the rollout at the current θ (over every process's
    rollout: a collective), in the KL's numerics:
    against ``exp.kl_logprobs`` with an fp32 forward of the bare model when the rollout measured
    π_old in a separate fp32 forward (the prepared module's forward would re-enter autocast),
    else against the behaviour log-probs in the training numerics."""
    rows = torch.arange(exp.size)
    if exp.kl_logprobs is not None:
        mask = full_logprob_mask(exp.response_mask, exp.prompt_length)
        logp = fp32_policy_logprobs(
            sess.model, exp.input_ids, exp.attention_mask, mask, cfg.temperature
        )[:, exp.prompt_length - 1 :]
        old = exp.kl_logprobs
    else:
        module = sess.module
        was = module.training
        module.eval()
        try:
            with sess.accelerator.autocast():
                logp, _, _ = module(**exp.rows(rows), temperature=cfg.temperature)
        finally:
            module.train(was)
        old = exp.old_logprobs
    # KL(π_old‖π_θ) on tokens drawn from π_old: k3 with π_old as the sampling side
    total, count = sess.dist.sum_floats(
        float(masked_sum(k3(old, logp.float()), exp.response_mask)),
        float(exp.response_mask.sum()),
    )
    return total / count if count > 0 else 0.0


def train(cfg: PPOConfig) -> dict[str, float]:
    """Run PPO (or PPO-penalty for a :class:`PPOPenaltyConfig`); returns the final metrics."""
    penalty_ctl = (
        PPOPenaltyKL(cfg.penalty_beta, cfg.penalty_target)
        if isinstance(cfg, PPOPenaltyConfig)
        else None
    )

    def update(sess: RLSession, exp: Experience, beta: float, step: int) -> dict[str, float]:
        adv, ret = advantages_and_returns(exp, beta, cfg, sess.dist)
        return ppo_update(sess, exp, adv, ret, beta, cfg, step, penalty_ctl)

    def after_update(sess: RLSession, exp: Experience, metrics: dict[str, float]) -> None:
        if penalty_ctl is None:
            return
        metrics["penalty_beta"] = penalty_ctl.beta  # the β_old this iteration used
        metrics["kl_old_new/after"] = kl_old_new(sess, exp, cfg)
        penalty_ctl.update(metrics["kl_old_new/after"])

    return train_loop(
        cfg,
        update,
        value_head=True,
        optimizer_steps_per_iteration=cfg.ppo_epochs * cfg.num_mini_batches,
        states={"penalty_controller": penalty_ctl} if penalty_ctl is not None else None,
        after_update=after_update,
    )


def ppo_update(
    sess: RLSession,
    exp: Experience,
    adv: torch.Tensor,
    ret: torch.Tensor,
    beta: float,
    cfg: PPOConfig,
    step: int,
    penalty_ctl: PPOPenaltyKL | None,
) -> dict[str, float]:
    """``ppo_epochs`` passes of mini-batch updates over one rollout; averaged diagnostics."""
    module, optimizer, scheduler, acc = (
        sess.module,
        sess.optimizer,
        sess.scheduler,
        sess.accelerator,
    )
    n = exp.size
    mb = n // cfg.num_mini_batches
    micro = mb // cfg.gradient_accumulation_steps
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    dist = sess.dist
    sums, local = MetricSums(), {"grad_norm": []}
    steps = 0
    stopped_epoch = cfg.ppo_epochs
    module.train()
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=gen).to(exp.input_ids.device)
        epoch_kl = MetricSums()
        for m in range(cfg.num_mini_batches):
            rows = perm[m * mb : (m + 1) * mb]
            denom = aggregation_denominator(cfg.loss_aggregation, exp.response_mask[rows], dist)
            for c in range(cfg.gradient_accumulation_steps):
                idx = rows[c * micro : (c + 1) * micro]
                mask = exp.response_mask[idx]
                with acc.autocast():
                    logp, ent, values = module(
                        **exp.rows(idx),
                        temperature=cfg.temperature,
                        return_entropy=cfg.entropy_coef > 0,
                    )
                    logp = logp.float()
                    w = tis_weights(exp, idx, cfg.tis_cap)
                    if penalty_ctl is not None:
                        pg = ppo_penalty_loss(
                            logp,
                            exp.old_logprobs[idx],
                            adv[idx],
                            mask,
                            penalty_ctl.beta,
                            cfg.loss_aggregation,
                            denom,
                            weights=w,
                        )
                    else:
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
                    vloss, vclip = value_loss(
                        values,
                        exp.values[idx],
                        ret[idx],
                        mask,
                        cfg.value_clip,
                        cfg.loss_aggregation,
                        denom,
                    )
                    loss = pg.loss + cfg.vf_coef * vloss
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
                    if cfg.entropy_coef > 0 and ent is not None:
                        loss = loss - cfg.entropy_coef * aggregate(
                            ent.float(), mask, cfg.loss_aggregation, denom
                        )
                acc.backward(loss * dist.grad_scale)
                tokens = mask.sum()
                sums.total("loss/policy", pg.loss.detach())
                sums.total("loss/value", vloss.detach())
                for k, v in (
                    ("clip_fraction", pg.clip_fraction),
                    ("value_clip_fraction", vclip),
                    ("kl_old_new", pg.kl_old_new),
                    ("ratio", pg.ratio_mean),
                ):
                    sums.mean(k, v.detach(), tokens)
                if w is not None:
                    sums.mean("tis/weight", masked_mean(w, mask), tokens)
                epoch_kl.mean("kl", pg.kl_old_new.detach(), tokens)
            grad_norm = guarded_optimizer_step(
                acc, module, optimizer, scheduler, cfg.max_grad_norm, sess.guard, loss.detach()
            )
            steps += 1
            if grad_norm is not None and math.isfinite(grad_norm):
                local["grad_norm"].append(grad_norm)
        # the early-stop decision is the global batch's, so every process stops together
        if cfg.target_kl is not None and penalty_ctl is None:
            if epoch_kl.reduce(dist).get("kl", 0.0) > 1.5 * cfg.target_kl:
                stopped_epoch = epoch + 1
                break
    out = update_metrics(sums, dist, steps, ("loss/policy", "loss/value"), local)
    out["epochs"] = float(stopped_epoch)
    return out
