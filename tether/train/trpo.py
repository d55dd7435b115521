"""TRPO for language models (``tether train trpo``): a hard KL trust region on every update.

Schulman et al. 2015 (arXiv:1502.05477) maximise the surrogate L(θ) = Ê_t[ρ_t(θ)·A_t] subject to
KL̄(π_old‖π_θ) ≤ δ, where KL̄ is the mean over response tokens of the KL between the next-token
distributions — exact over the vocabulary here, not a sampled estimate. Per iteration:

1. a rollout (:func:`tether.train.rl.collect`) with the reference KL shaped into the per-token
   reward (``kl_in="reward"``: the soft penalty to π_ref stays; the trust region is about π_old);
2. advantages: GAE from a linear value head on the policy's *detached* hidden states (the critic
   cannot move the policy), or a group baseline (``advantage=rloo|grpo``, G ≥ 2);
3. the natural-gradient step: g = ∇L, s ≈ F⁻¹g by ``cg_iters`` conjugate-gradient iterations on
   Fisher-vector products (double back-propagation through the model of the exact mean KL, with
   ``cg_damping``), maximal step √(2δ/sᵀFs)·s, backtracking ×``backtrack_ratio`` up to
   ``max_backtracks`` times until the surrogate improves *and* the measured KL ≤ δ, else the
   parameters stay (:mod:`tether.core.trust_region`);
4. the value head regressed on the λ-returns (AdamW, ``vf_iters`` passes) on features recomputed
   after the step.

Only trainable parameters span the natural-gradient space, so with LoRA the step is over the
adapters. Second-order autograd needs a differentiable attention backward, so the policy step runs
with PyTorch's math SDPA kernel, in eval mode (no dropout, no activation checkpointing), in fp32.

Several processes: every process holds its share of the rollout; the surrogate, its gradient,
every Fisher-vector product, the line search's surrogate and KL and the value head's gradient are
sums over processes of per-process terms normalised by the *global* token count, so conjugate
gradient and the line search run on identical numbers everywhere and every process takes the same
step (as one process would on the whole rollout).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor

from tether.configs.trpo import TRPOConfig  # the config lives in tether.configs
from tether.core.advantages import gae, group_relative, leave_one_out, whiten_advantages
from tether.core.masked import masked_mean, masked_sum
from tether.core.trust_region import (
    conjugate_gradient,
    fisher_vector_product,
    flat_grad,
    line_search,
    max_step_length,
)
from tether.models import forward_logprobs
from tether.train.distributed import Dist
from tether.train.rl import (
    Experience,
    RLSession,
    full_logprob_mask,
    sequence_rewards,
    shaped_token_rewards,
    tis_weights,
    train_loop,
)


def trpo_advantages(
    exp: Experience, beta: float, cfg: TRPOConfig, dist: Dist | None = None
) -> tuple[Tensor, Tensor | None]:
    """(N, R) advantages and (N, R) λ-returns (None without a critic); whitened over every
    process's response tokens with ``dist``."""
    if cfg.advantage == "gae":
        rewards = shaped_token_rewards(exp, beta, cfg.kl_in)
        adv, ret = gae(rewards, exp.values, exp.response_mask, cfg.gamma, cfg.lam)
    else:
        seq = sequence_rewards(exp, beta, cfg.kl_in)
        g = cfg.num_generations
        per_seq = (  # over each group's valid members (a skipped sample gets 0)
            leave_one_out(seq, g, valid=exp.valid)
            if cfg.advantage == "rloo"
            else group_relative(seq, g, valid=exp.valid)
        )
        adv, ret = torch.where(exp.response_mask, per_seq[:, None], 0.0), None
    if cfg.whiten_advantages:
        adv = whiten_advantages(adv, exp.response_mask, reduce=None if dist is None else dist.sum)
    return adv, ret


def _policy_outputs(model: Any, exp: Experience, temperature: float) -> tuple[Tensor, Tensor]:
    """(N, R) log-probs of the sampled tokens and (N, R, V) fp32 logits, at the current θ."""
    p = exp.prompt_length
    out = forward_logprobs(
        model,
        exp.input_ids,
        exp.attention_mask,
        mask=full_logprob_mask(exp.response_mask, p),
        temperature=temperature,
        return_logits=True,
    )
    return out.logprobs[:, p - 1 :], out.logits[:, p - 1 :].float()


def _mean_kl(
    old_logits: Tensor, logits: Tensor, mask: Tensor, count: float | None = None
) -> Tensor:
    """Mean over masked tokens of KL(softmax(old)‖softmax(new)), exact, twice differentiable;
    with ``count``, the masked sum over ``count`` (a global token count: this process's share)."""
    old_lp = torch.log_softmax(old_logits, -1)
    new_lp = torch.log_softmax(logits, -1)
    per_token = (old_lp.exp() * (old_lp - new_lp)).sum(-1)  # (N, R)
    if count is not None:
        return masked_sum(per_token, mask) / max(count, 1.0)
    return masked_mean(per_token, mask)


def trpo_policy_step(
    sess: RLSession, exp: Experience, adv: Tensor, cfg: TRPOConfig
) -> dict[str, float]:
    """One natural-gradient step with the KL-constrained line search; returns its diagnostics."""
    model = sess.model
    dist = sess.dist
    params = [p for p in model.parameters() if p.requires_grad]
    mask = exp.response_mask
    n_tokens = dist.sum_floats(float(mask.sum()))[0]  # the global token count

    def share(per_token: Tensor) -> Tensor:
        """This process's share of the global token mean."""
        return masked_sum(per_token, mask) / max(n_tokens, 1.0)

    weights = tis_weights(exp, torch.arange(exp.size, device=mask.device), cfg.tis_cap)
    if weights is not None:
        adv = adv * weights
    was = model.training
    model.eval()
    kernel: Any = contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kernel = sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # older torch: the default kernels (may lack double backward)
        pass
    try:
        with kernel:
            logp, logits = _policy_outputs(model, exp, cfg.temperature)
            # π_old in the numerics of this fp32 step (this forward is at θ_old): the rollout's
            # behaviour log-probs were computed under the training autocast and would put its
            # rounding noise into the ratio.
            old_logp = logp.detach().float()
            old_logits = logits.detach()
            surrogate = share((logp.float() - old_logp).exp() * adv)
            g = dist.sum(flat_grad(surrogate, params, retain_graph=True))
            fvp = fisher_vector_product(
                _mean_kl(old_logits, logits, mask, n_tokens),
                params,
                cfg.cg_damping,
                reduce=dist.sum if dist.world > 1 else None,
            )
            direction = conjugate_gradient(fvp, g, cfg.cg_iters)
            step_len = max_step_length(direction, fvp(direction), cfg.max_kl)
            full_step = (step_len * direction).detach()
            expected = float(g.dot(full_step))
            surrogate_old = dist.sum_floats(float(surrogate.detach()))[0]
            del fvp, logits, logp, surrogate

            def evaluate() -> tuple[float, float]:
                lp, lg = _policy_outputs(model, exp, cfg.temperature)
                sur = share((lp.float() - old_logp).exp() * adv)
                kl = _mean_kl(old_logits, lg, mask, n_tokens)
                total_sur, total_kl = dist.sum_floats(float(sur), float(kl))
                return total_sur, total_kl

            with torch.no_grad():
                res = line_search(
                    params,
                    full_step,
                    evaluate,
                    surrogate_old,
                    cfg.max_kl,
                    expected,
                    cfg.backtrack_ratio,
                    cfg.max_backtracks,
                )
    finally:
        model.train(was)
    guard = getattr(sess, "guard", None)
    if guard is not None:
        # a non-finite direction is never accepted by the line search (the parameters are
        # restored); the guard counts it, and stops a run that only produces such steps
        if math.isfinite(expected) and math.isfinite(surrogate_old):
            guard.good()
        else:
            guard.skip("a non-finite natural-gradient step (surrogate or its gradient)")
    return {
        "trpo/accepted": float(res.accepted),
        "trpo/step_fraction": res.step_fraction,
        "trpo/backtracks": float(res.backtracks),
        "trpo/kl": res.kl,
        "trpo/improvement": res.improvement,
        "trpo/expected_improvement": res.expected_improvement,
        "trpo/step_norm": float(full_step.norm()),
        "trpo/grad_norm": float(g.norm()),
    }


def fit_value_head(sess: RLSession, exp: Experience, ret: Tensor, cfg: TRPOConfig) -> float:
    """Regress the value head on the λ-returns over features at the new θ; the final loss."""
    head = sess.value_head
    model = sess.model
    p = exp.prompt_length
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), sess.accelerator.autocast():
            hidden = (
                forward_logprobs(
                    model,
                    exp.input_ids,
                    exp.attention_mask,
                    mask=full_logprob_mask(torch.zeros_like(exp.response_mask), p),
                    return_hidden=True,
                )
                .hidden[:, :-1][:, p - 1 :]
                .float()
            )  # (N, R, H)
    finally:
        model.train(was)
    mask = exp.response_mask
    dist = sess.dist
    n_tokens = max(dist.sum_floats(float(mask.sum()))[0], 1.0)
    loss = torch.zeros(())
    for _ in range(cfg.vf_iters):
        values = head(hidden)  # (N, R)
        # this process's share of the global token mean; the gradients are summed over processes
        loss = 0.5 * masked_sum((values - ret).square(), mask) / n_tokens
        sess.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.world > 1:
            for p in head.parameters():
                if p.grad is not None:
                    p.grad.copy_(dist.sum(p.grad))
        sess.optimizer.step()
    sess.scheduler.step()
    sess.optimizer.zero_grad(set_to_none=True)
    return dist.sum_floats(float(loss.detach()))[0]


def train(cfg: TRPOConfig) -> dict[str, float]:
    """Run TRPO as configured; returns the final metrics."""

    def update(sess: RLSession, exp: Experience, beta: float, step: int) -> dict[str, float]:
        adv, ret = trpo_advantages(exp, beta, cfg, sess.dist)
        stats = trpo_policy_step(sess, exp, adv, cfg)
        if ret is not None:
            stats["loss/value"] = fit_value_head(sess, exp, ret, cfg)
        return stats

    critic = cfg.advantage == "gae"
    return train_loop(
        cfg,
        update,
        value_head=critic,
        optimize="value_head" if critic else "all",  # without a critic nothing is stepped
        optimizer_steps_per_iteration=1,
    )
