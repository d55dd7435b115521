"""The on-policy rollout and the three updates of ``tether control``: PPO, PPO-penalty, TRPO.

One rollout layout for all: ``n_envs`` environments × ``n_steps`` steps, flattened to
``N = n_envs · n_steps`` samples for the update. GAE runs per environment over time with
:func:`tether.core.advantages.gae_recursion` in its general form: a *terminated* step does not
bootstrap, a *truncated* one (time limit) bootstraps from V of its true last observation, and no
advantage chains across an episode boundary or past the rollout's end (which bootstraps from V of
the next observation).

The losses are :mod:`tether.core.losses`' (``ppo_clip_loss``, ``ppo_penalty_loss``,
``value_loss``), the distributions :mod:`tether.core.distributions`', the trust region
:mod:`tether.core.trust_region`'s; this module only arranges tensors for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from tether.control.config import (
    PPOControlConfig,
    PPOPenaltyControlConfig,
    SGDConfig,
    TRPOControlConfig,
)
from tether.control.envs import EnvPool
from tether.control.normalize import ObsNormalizer, RewardScaler
from tether.control.policy import ControlPolicy, DistParams
from tether.core.advantages import gae_recursion, whiten_advantages
from tether.core.losses import ppo_clip_loss, ppo_penalty_loss, value_loss
from tether.core.trust_region import (
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    line_search,
    max_step_length,
)


@dataclass
class Batch:
    """One rollout, flattened to N = n_envs·n_steps samples, environment-major (sample i·T + t is
    environment i's step t)."""

    obs: Tensor  # (N, obs_dim) normalised observations the policy saw
    actions: Tensor  # (N,) or (N, d)
    logp: Tensor  # (N,) log π_old(a | s)
    old: DistParams  # π_old at every sample (detached)
    values: Tensor  # (N,) V_old(s)
    advantages: Tensor  # (N,)
    returns: Tensor  # (N,) λ-returns, the critic's targets

    @property
    def size(self) -> int:
        return int(self.obs.shape[0])


@torch.no_grad()
def collect_rollout(
    pool: EnvPool,
    policy: ControlPolicy,
    obs: np.ndarray,
    obs_norm: ObsNormalizer,
    reward_scaler: RewardScaler,
    n_steps: int,
    gamma: float,
    lam: float,
) -> tuple[Batch, np.ndarray]:
    """Run ``n_steps`` steps in every environment from raw observations ``obs`` (n, obs_dim).

    Returns the batch (advantages by GAE) and the raw observations to continue from. The
    observation statistics are updated with every new observation (the caller updates them
    with the first ones after a reset).
    """
    n, d_obs = pool.n, pool.spec.obs_dim
    t_obs = torch.empty(n_steps, n, d_obs)
    t_logp = torch.empty(n_steps, n)
    t_val = torch.empty(n_steps, n)
    t_next_val = torch.empty(n_steps, n)
    t_rew = torch.empty(n_steps, n, dtype=torch.float64)
    t_term = torch.zeros(n_steps, n, dtype=torch.bool)
    t_done = torch.zeros(n_steps, n, dtype=torch.bool)
    actions: list[Tensor] = []
    dists: list[Tensor] = []
    o = torch.from_numpy(obs_norm(obs))
    v = policy.value(o)
    for t in range(n_steps):
        dist = policy.dist(o)
        a = dist.sample()
        t_obs[t] = o
        t_logp[t] = dist.log_prob(a)
        t_val[t] = v
        actions.append(a)
        dists.append(dist.logits if dist.logits is not None else dist.mean)  # type: ignore[arg-type]
        raw_next, rew, term, trunc, final = pool.step(a.numpy())
        done = term | trunc
        t_rew[t] = torch.from_numpy(reward_scaler(rew, done))
        t_term[t] = torch.from_numpy(term)
        t_done[t] = torch.from_numpy(done)
        obs_norm.update(raw_next)
        o = torch.from_numpy(obs_norm(raw_next))
        v = policy.value(o)  # V(s_{t+1}); after a reset, the new episode's first state
        next_v = v
        cut = np.flatnonzero(trunc & ~term)
        if len(cut):  # a time limit: bootstrap from V of the true last observation
            next_v = v.clone()
            next_v[torch.from_numpy(cut)] = policy.value(torch.from_numpy(obs_norm(final[cut])))
        t_next_val[t] = next_v
    # (T, n) → (n, T) for the time recursion
    rewards = t_rew.T.float()
    bootstrap = ~t_term.T
    chain = ~t_done.T
    chain[:, -1] = False
    adv, ret = gae_recursion(rewards, t_val.T, t_next_val.T, bootstrap, chain, gamma=gamma, lam=lam)
    old_param = torch.stack(dists)  # (T, n, k)
    flat_old = old_param.transpose(0, 1).reshape(n * n_steps, -1)
    if pool.spec.discrete:
        old = DistParams(logits=flat_old)
        act = torch.stack(actions).T.reshape(-1)
    else:
        old = DistParams(mean=flat_old, log_std=policy.log_std.detach().clone())
        act = torch.stack(actions).transpose(0, 1).reshape(n * n_steps, -1)
    batch = Batch(
        obs=t_obs.transpose(0, 1).reshape(n * n_steps, d_obs),
        actions=act,
        logp=t_logp.T.reshape(-1),
        old=old,
        values=t_val.T.reshape(-1),
        advantages=adv.reshape(-1).float(),
        returns=ret.reshape(-1).float(),
    )
    return batch, raw_next


def _whiten(x: Tensor) -> Tensor:
    """Advantages whitened over the batch (:func:`tether.core.advantages.whiten_advantages`);
    a single sample is left as it is (its variance is undefined)."""
    if x.numel() < 2:
        return x
    return whiten_advantages(x, torch.ones_like(x, dtype=torch.bool))


def explained_variance(pred: Tensor, target: Tensor) -> float:
    """1 − Var[target − pred] / Var[target] (NaN when the target is constant)."""
    var = target.var()
    return float("nan") if var == 0 else float(1.0 - (target - pred).var() / var)


def _col(x: Tensor) -> Tensor:
    return x.reshape(-1, 1)


def step_if_finite(
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    loss: Tensor,
    max_grad_norm: float | None,
) -> bool:
    """Clip the gradient norm (if configured) and step — unless the loss or the gradient norm is
    not finite: then the gradients are dropped and nothing steps (returns False). With clipping
    off the norm is still measured (clipping at +inf scales the gradients by exactly 1)."""
    clip = max_grad_norm if max_grad_norm is not None else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    if not (bool(torch.isfinite(loss.detach())) and bool(torch.isfinite(norm))):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    return True


def sgd_update(
    policy: ControlPolicy,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: SGDConfig,
    *,
    clip_range: float | None = None,
    beta: float | None = None,
) -> dict[str, float]:
    """Epochs of minibatch Adam on the PPO clip loss (``clip_range``) or the penalty loss
    (``beta``), plus the value loss and the entropy bonus."""
    n, bs = batch.size, cfg.batch_size
    target_kl = getattr(cfg, "target_kl", None)
    sums = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
    kls: list[float] = []
    updates, skipped, stopped = 0, 0, False
    epochs_done = 0
    params = list(policy.parameters())
    for _ in range(cfg.n_epochs):
        perm = torch.randperm(n)
        for start in range(0, n - bs + 1, bs):  # full minibatches only (a ragged tail is dropped)
            idx = perm[start : start + bs]
            dist = policy.dist(batch.obs[idx])
            logp = dist.log_prob(batch.actions[idx])
            adv = batch.advantages[idx]
            if cfg.normalize_advantage:
                adv = _whiten(adv)
            mask = torch.ones(len(idx), 1, dtype=torch.bool)
            if beta is None:
                assert clip_range is not None
                out = ppo_clip_loss(_col(logp), _col(batch.logp[idx]), _col(adv), mask, clip_range)
            else:
                out = ppo_penalty_loss(_col(logp), _col(batch.logp[idx]), _col(adv), mask, beta)
            kl = float(out.kl_old_new)
            if target_kl is not None and kl > 1.5 * target_kl:
                stopped = True
                break
            v = policy.value(batch.obs[idx])
            vloss, _ = value_loss(
                _col(v),
                _col(batch.values[idx]),
                _col(batch.returns[idx]),
                mask,
                clip_range=cfg.clip_range_vf,
            )
            entropy = dist.entropy().mean()
            loss = out.loss + cfg.vf_coef * vloss - cfg.ent_coef * entropy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not step_if_finite(optimizer, params, loss, cfg.max_grad_norm):
                skipped += 1  # a non-finite loss or gradient: this minibatch is not taken
                continue
            updates += 1
            kls.append(kl)
            sums["policy_loss"] += float(out.loss.detach())
            sums["value_loss"] += float(vloss.detach())
            sums["entropy"] += float(entropy.detach())
            sums["clip_fraction"] += float(out.clip_fraction)
        if stopped:
            break
        epochs_done += 1
    metrics = {k: v / max(updates, 1) for k, v in sums.items()}
    metrics.update(
        approx_kl=float(np.mean(kls)) if kls else 0.0,
        n_updates=float(updates),
        skipped_updates=float(skipped),
        epochs=float(epochs_done),
        early_stop=float(stopped),
    )
    return metrics


@torch.no_grad()
def kl_old_new(policy: ControlPolicy, batch: Batch) -> float:
    """Exact mean KL(π_old‖π_θ) over the rollout's states (closed form)."""
    return float(batch.old.kl(policy.dist(batch.obs)).mean())


def ppo_update(
    policy: ControlPolicy,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: PPOControlConfig,
    clip_range: float,
) -> dict[str, float]:
    metrics = sgd_update(policy, optimizer, batch, cfg, clip_range=clip_range)
    metrics["kl_old_new"] = kl_old_new(policy, batch)
    metrics["clip_range"] = clip_range
    return metrics


def ppo_penalty_update(
    policy: ControlPolicy,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: PPOPenaltyControlConfig,
    beta: float,
) -> dict[str, float]:
    """One PPO-penalty update at β; the caller feeds ``kl_old_new`` to the β rule."""
    metrics = sgd_update(policy, optimizer, batch, cfg, beta=beta)
    metrics["kl_old_new"] = kl_old_new(policy, batch)
    return metrics


def _surrogate_and_kl(policy: ControlPolicy, batch: Batch, adv: Tensor) -> tuple[Tensor, Tensor]:
    dist = policy.dist(batch.obs)
    ratio = torch.exp(dist.log_prob(batch.actions) - batch.logp)
    return (ratio * adv).mean(), batch.old.kl(dist).mean()


def trpo_update(
    policy: ControlPolicy,
    vf_optimizer: torch.optim.Optimizer,
    batch: Batch,
    cfg: TRPOControlConfig,
) -> dict[str, float]:
    """One TRPO iteration: natural-gradient policy step inside KL ≤ δ, then value regression."""
    params = policy.policy_parameters()
    adv = _whiten(batch.advantages) if cfg.normalize_advantage else batch.advantages
    surrogate, mean_kl = _surrogate_and_kl(policy, batch, adv)
    g = flat_grad(surrogate, params, retain_graph=True)
    fvp = fisher_vector_product(mean_kl, params, damping=cfg.cg_damping)
    direction = conjugate_gradient(fvp, g, iterations=cfg.cg_iters)
    step_len = max_step_length(direction, fvp(direction), cfg.max_kl)
    full_step = step_len * direction

    def evaluate() -> tuple[float, float]:
        s, k = _surrogate_and_kl(policy, batch, adv)
        return float(s), float(k)

    result = line_search(
        params,
        full_step.detach(),
        evaluate,
        float(surrogate.detach()),
        cfg.max_kl,
        float(g.dot(full_step).detach()),
        backtrack=cfg.backtrack_ratio,
        max_backtracks=cfg.max_backtracks,
    )
    vsum, vn, skipped = 0.0, 0, 0
    value_params = list(policy.value_parameters())
    n = batch.size
    for _ in range(cfg.vf_iters):
        perm = torch.randperm(n)
        for start in range(0, n, cfg.vf_batch_size):
            idx = perm[start : start + cfg.vf_batch_size]
            v = policy.value(batch.obs[idx])
            mask = torch.ones(len(idx), 1, dtype=torch.bool)
            loss, _ = value_loss(
                _col(v), _col(batch.values[idx]), _col(batch.returns[idx]), mask, clip_range=None
            )
            vf_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not step_if_finite(vf_optimizer, value_params, loss, cfg.max_grad_norm):
                skipped += 1
                continue
            vsum += float(loss.detach())
            vn += 1
    return {
        "trpo/accepted": float(result.accepted),
        "trpo/step_fraction": result.step_fraction,
        "trpo/backtracks": float(result.backtracks),
        "trpo/improvement": result.improvement,
        "trpo/expected_improvement": result.expected_improvement,
        "kl_old_new": kl_old_new(policy, batch),
        "trpo/line_search_kl": result.kl,
        "value_loss": vsum / max(vn, 1),
        "skipped_updates": float(skipped),
        "entropy": float(policy.dist(batch.obs).entropy().mean().detach()),
    }
