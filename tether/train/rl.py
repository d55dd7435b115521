"""What the on-policy RL trainers for language models share: config, rollout, scoring, KL.

One iteration of PPO / PPO-penalty / GRPO / RLOO / TRPO starts the same way (the flow in
DESIGN.md): prompts → G sampled completions each (KV cache, at the training precision) →
behaviour log-probs π_old → reference log-probs → per-token KL with the chosen estimator →
rewards from any reward function (validated) → the penalty placed either in the reward
(``kl_in="reward"``: −β·KL_t per token, the score on the last token; Ziegler et al. 2019,
arXiv:1909.08593 eq. 2) or in the loss (``kl_in="loss"``: β·ρ·k3 with the importance weight that
makes its gradient ∇KL(π_θ‖π_ref); GRPO arXiv:2402.03300 eq. 3, corrected per Zhang et al. 2025,
arXiv:2505.17508). β comes from any controller of :mod:`tether.core.controllers`.

Numerics (``kl_precision``, :mod:`tether.models.numerics`): both sides of every KL log-ratio a user
or a controller reads are computed in fp32 by default, also under bf16 training, where the
behaviour log-probs of the PPO ratio stay in the training numerics; ``kl/k3_minus_exact`` (the
sampled k3 against the exact fp32 KL on the same responses) shows the noise floor,
``kl/sampler_trainer`` the mismatch between the sampler's and the trainer's log-probs, which
``tis_cap`` corrects by truncated importance sampling.

Layout: a rollout of N = B·G sequences is kept as ``input_ids`` (N, P + R) — left-padded prompts
of width P, responses of width R after them — and every per-token tensor of the response is
(N, R) with ``response_mask`` (N, R) True up to and including the first EOS. Column j of the
response is predicted by column P − 1 + j of the log-prob layout of :func:`forward_logprobs`.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from tether.configs.rl import KLPlacement, RLConfig  # the config lives in tether.configs
from tether.core.controllers import KLController, make_controller
from tether.core.kl import (
    Estimator,
    anchored_ref_logp,
    estimate,
    exact_from_logits,
    k1,
    k3,
    loss_term,
)
from tether.core.losses import truncated_importance_weights
from tether.core.masked import masked_mean, masked_sum
from tether.data import PromptExample, load_prompt_dataset
from tether.errors import TetherWarning
from tether.models import SamplingConfig, ValueHead, forward_logprobs, generate
from tether.models.generation import sample_seeds
from tether.models.loading import check_generation_fits
from tether.models.logprobs import unwrap_model
from tether.models.numerics import (
    check_fp32_weights,
    fp32_numerics,
    fp32_policy_logprobs,
    kl_numerics,
    separate_kl_forward,
    weights_are_fp32,
)
from tether.models.rollout import RolloutWeights, params_sharded, rollout_weights
from tether.reference import ReferencePolicy, make_reference
from tether.rewards import RewardFn, call_reward, make_reward
from tether.runs.config import ConfigError
from tether.runs.progress import Progress
from tether.train.common import (
    DataCursor,
    load_trainable_policy,
    make_accelerator,
    make_evaluator,
    model_state_for_checkpoint,
    prepare_training,
    resolve_mixed_precision,
    save_policy_to,
    split_heldout_prompts,
    start_run,
    uses_fsdp2,
)
from tether.train.distributed import Dist, MetricSums, check_same, memory_metrics
from tether.train.guards import KLWatch, StepGuard, UpdateSnapshot, all_finite


def make_kl_controller(cfg: RLConfig) -> KLController:
    """β's controller from the config (β = 0 and fixed when ``kl_in="none"``)."""
    if cfg.kl_in == "none":
        return make_controller("fixed", beta=0.0)
    if cfg.kl_controller == "adaptive":
        return make_controller(
            "adaptive", init_beta=cfg.kl_coef, target=cfg.kl_target, horizon=cfg.kl_horizon
        )
    if cfg.kl_controller == "pid":
        return make_controller(
            "pid",
            target=cfg.kl_target,
            kp=cfg.pid_kp,
            ki=cfg.pid_ki,
            kd=cfg.pid_kd,
            init_beta=cfg.kl_coef,
        )
    return make_controller("fixed", beta=cfg.kl_coef)


def load_prompts(cfg: RLConfig, tokenizer: Any) -> list[PromptExample]:
    if not cfg.prompts:
        raise ValueError("prompts is required: a prompt file with a 'prompt' column")
    return list(
        load_prompt_dataset(
            cfg.prompts, tokenizer, max_prompt_length=cfg.max_prompt_length, as_chat=cfg.as_chat
        )
    )


def sampling_config(cfg: RLConfig) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
    )


class PolicyWithValue(nn.Module):
    """The policy (and optionally a value head on its hidden states) as one module whose forward
    is tether's chunked log-prob computation: ``accelerate.prepare`` wraps this, so DDP sees the
    whole forward. Returns ``(logprobs, entropy, values)`` for the response columns only.

    ``detach_value=True`` trains the value head on detached hidden states: the critic then
    cannot move the policy (TRPO: the trust region is for the policy's parameters alone).
    """

    def __init__(self, model: nn.Module, value_head: ValueHead | None = None) -> None:
        super().__init__()
        self.model = model
        self.value_head = value_head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        prompt_length: int,
        temperature: float = 1.0,
        return_entropy: bool = False,
        detach_value: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        mask = full_logprob_mask(response_mask, prompt_length)
        out = forward_logprobs(
            self.model,
            input_ids,
            attention_mask,
            mask=mask,
            temperature=temperature,
            return_entropy=return_entropy,
            return_hidden=self.value_head is not None,
        )
        cols = slice(prompt_length - 1, None)
        values = None
        if self.value_head is not None:
            h = out.hidden[:, :-1]  # (N, T−1, H): position t is the state before token t+1
            values = self.value_head(h.detach() if detach_value else h)[:, cols]  # (N, R)
        entropy = out.entropy[:, cols] if out.entropy is not None else None
        return out.logprobs[:, cols], entropy, values


def full_logprob_mask(response_mask: Tensor, prompt_length: int) -> Tensor:
    """(N, R) response mask → (N, P + R − 1) mask in :func:`forward_logprobs`' layout."""
    n = response_mask.shape[0]
    pad = response_mask.new_zeros(n, prompt_length - 1)
    return torch.cat([pad, response_mask], dim=1)


@dataclass
class Experience:
    """One rollout, scored. Per-token tensors are (N, R) in the response layout."""

    input_ids: Tensor
    attention_mask: Tensor
    prompt_length: int
    response_mask: Tensor
    """(N, R) bool; all False for samples dropped for an invalid reward."""
    old_logprobs: Tensor | None
    """(N, R) log π_old of the sampled tokens (the behaviour policy, training precision); None
    until known when the behaviour forward was skipped (see :func:`collect`)."""
    ref_logprobs: Tensor
    """(N, R) log π_ref, in the KL's numerics (``kl_precision``)."""
    kl: Tensor | None
    """(N, R) per-token KL(π_old‖π_ref) estimate (the configured estimator); 0 off the mask.
    None until :func:`kl_stats` has run."""
    scores: Tensor
    """(N,) reward-function scores (0 for dropped samples)."""
    valid: Tensor
    """(N,) bool: the sample's reward was finite."""
    prompts: list[str]
    completions: list[str]
    finished: Tensor
    """(N,) bool: the response ended with EOS."""
    values: Tensor | None = None
    """(N, R) critic values at sampling time, when the trainer has a critic."""
    kl_logprobs: Tensor | None = None
    """(N, R) log π_old from a separate forward in the KL's numerics (fp32) when the training
    forward is not fp32; None when ``old_logprobs`` already are in the KL's numerics."""
    sampler_logprobs: Tensor | None = None
    """(N, R) the sampler's own log-probs of the drawn tokens (the rollout copy or the KV-cache
    decode, after temperature/top-k/top-p); for the sampler/trainer mismatch and TIS."""
    stats: dict[str, float] = field(default_factory=dict)
    """This process's rollout statistics (:attr:`sums` reduced over this process alone)."""
    sums: MetricSums = field(default_factory=MetricSums)
    """The same statistics as (numerator, denominator) pairs, for the reduction over processes."""

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def policy_kl_logprobs(self) -> Tensor | None:
        """log π_old in the KL's numerics: the policy side of every reference log-ratio."""
        return self.kl_logprobs if self.kl_logprobs is not None else self.old_logprobs

    def rows(self, idx: Tensor) -> dict[str, Any]:
        """The model inputs of rows ``idx``."""
        return {
            "input_ids": self.input_ids[idx],
            "attention_mask": self.attention_mask[idx],
            "response_mask": self.response_mask[idx],
            "prompt_length": self.prompt_length,
        }


def _decode(tokenizer: Any, ids: Tensor, mask: Tensor) -> list[str]:
    return [
        tokenizer.decode(ids[i][mask[i]], skip_special_tokens=True) for i in range(ids.shape[0])
    ]


@torch.no_grad()
def collect(
    model: nn.Module,
    tokenizer: Any,
    reference: ReferencePolicy,
    reward_fn: RewardFn,
    examples: list[PromptExample],
    cfg: RLConfig,
    autocast: Any = contextlib.nullcontext,
    value_module: PolicyWithValue | None = None,
    behaviour_logprobs: bool = True,
    sampler_weights: RolloutWeights | None = None,
    seeds: list[int] | None = None,
    synced_processes: bool = False,
    step: int | None = None,
) -> Experience:
    """Sample G completions per prompt, score them, and measure the KL to the reference.

    Sampling and the behaviour log-probs run under ``autocast`` (the training precision), so
    the importance ratio of the first update is 1 up to the summation order. Both sides of the
    KL's log-ratio run in ``cfg.kl_precision``: with ``fp32`` under mixed precision the reference
    runs in fp32 and so does a separate policy forward (``kl_logprobs``), so that half-precision
    rounding noise is not read as KL (:mod:`tether.models.numerics`). With
    ``behaviour_logprobs=False`` the behaviour forward is skipped (``old_logprobs`` and ``kl`` are
    None): for a single on-policy update whose first training forward, at θ_old, supplies them
    (the caller then fills them and calls :func:`kl_stats`). With ``sampler_weights``, its
    half-precision copy of the weights is refreshed and draws the tokens; the behaviour
    log-probs still come from ``model``. With ``seeds`` (one per sequence, :func:`sample_seeds`)
    each sequence is sampled from its own generator, independently of the batch and the process.
    ``step`` (the training step) is named in reward errors (:func:`tether.rewards.call_reward`).
    """
    prompt_ids = [e.prompt_ids for e in examples for _ in range(cfg.num_generations)]
    if seeds is not None and len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(seeds)} sampling seeds for {len(prompt_ids)} sequences")
    prompts = [e.prompt for e in examples for _ in range(cfg.num_generations)]
    t0 = time.perf_counter()
    sampler = None
    if sampler_weights is not None:
        sampler_weights.sync()
        sampler = sampler_weights.model
    with autocast():
        rollout = generate(
            model,
            tokenizer,
            prompt_ids,
            sampling_config(cfg),
            compute_logprobs=behaviour_logprobs,
            compute_sampler_logprobs=True,
            sampler=sampler,
            row_seeds=seeds,
            synced_processes=synced_processes,
        )
    gen_s = time.perf_counter() - t0
    resp = rollout.response_mask
    completions = _decode(tokenizer, rollout.response_ids, resp)
    t1 = time.perf_counter()
    rewards = call_reward(
        reward_fn,
        prompts,
        completions,
        cfg.reward,
        step=step,
        rows=[e.index for e in examples for _ in range(cfg.num_generations)],
        on_invalid=cfg.reward_on_invalid,
    )
    reward_s = time.perf_counter() - t1
    device = rollout.input_ids.device
    valid = torch.tensor(rewards.valid, device=device)
    scores = torch.tensor([v if ok else 0.0 for v, ok in zip(rewards, rewards.valid, strict=True)])
    resp = resp & valid[:, None]
    p = rollout.prompt_length
    mask = full_logprob_mask(resp, p)
    t2 = time.perf_counter()
    with kl_numerics(cfg.kl_precision, autocast, device.type):
        ref = reference.logprobs(
            rollout.input_ids, rollout.attention_mask, mask, temperature=cfg.temperature
        ).logprobs[:, p - 1 :]
    ref_s = time.perf_counter() - t2
    kl_lp = None
    if separate_kl_forward(
        cfg.kl_precision, resolve_mixed_precision(cfg.mixed_precision), device.type
    ):
        kl_lp = fp32_policy_logprobs(
            model, rollout.input_ids, rollout.attention_mask, mask, cfg.temperature
        )
        kl_lp = torch.where(resp, kl_lp[:, p - 1 :], 0.0)
    kl_s = time.perf_counter() - t2
    with autocast():
        values = None
        if value_module is not None:  # (a DDP wrapper has no .value_head: not asked here)
            was = value_module.training
            value_module.eval()
            try:
                _, _, values = value_module(
                    rollout.input_ids, rollout.attention_mask, resp, p, cfg.temperature
                )
            finally:
                value_module.train(was)
    ref = torch.where(resp, ref.float().to(device), 0.0)
    exp = Experience(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        prompt_length=p,
        response_mask=resp,
        old_logprobs=None,
        ref_logprobs=ref,
        kl=None,
        scores=scores.to(device),
        valid=valid,
        prompts=prompts,
        completions=completions,
        finished=rollout.finished,
        values=None if values is None else torch.where(resp, values.float(), 0.0),
        kl_logprobs=kl_lp,
        sampler_logprobs=None
        if rollout.sampler_logprobs is None
        else torch.where(resp, rollout.sampler_logprobs.to(device), 0.0),
    )
    sums = exp.sums
    n_ok = float(valid.sum())
    ok_scores = scores[valid.cpu()].double()
    sums.ratio("score", ok_scores.sum(), n_ok)
    sums.ratio("_score_sq", ok_scores.square().sum(), n_ok)
    sums.total("_n_valid", n_ok)
    sums.ratio("response_length", resp.sum(), n_ok)
    sums.ratio("finished_fraction", rollout.finished.sum(), float(rollout.finished.numel()))
    sums.total("num_skipped", float(rewards.num_skipped))
    sums.total("_tokens", float(rollout.attention_mask.sum()))
    # seconds of each stage (means over processes): kl_s = ref_s (the reference forward) +
    # kl_fp32_s (kl_precision=fp32's separate fp32 policy forward under mixed precision)
    stages = {"gen_s": gen_s, "reward_s": reward_s, "kl_s": kl_s, "ref_s": ref_s}
    stages["kl_fp32_s"] = kl_s - ref_s
    for name, seconds in stages.items():
        sums.mean(name, seconds)
    if rollout.logprobs is not None:
        exp.old_logprobs = torch.where(resp, rollout.logprobs.float(), 0.0)
        kl_sums(exp, cfg.kl_estimator, sums)
    exp.stats = finish_stats(sums.reduce(Dist()))
    return exp


def finish_stats(reduced: dict[str, float]) -> dict[str, float]:
    """Reduced rollout sums → the logged statistics: ``score_std`` (unbiased, over the valid
    samples of every process) from the hidden second moment; hidden entries (``_…``) dropped."""
    out = {k: v for k, v in reduced.items() if not k.startswith("_")}
    if "_score_sq" in reduced:
        n = reduced.get("_n_valid", 0.0)
        var = reduced["_score_sq"] - reduced["score"] ** 2
        out["score_std"] = math.sqrt(max(var, 0.0) * n / (n - 1)) if n > 1 else 0.0
    return out


def kl_stats(exp: Experience, estimator: Estimator) -> dict[str, float]:
    """:func:`kl_sums` reduced over this process: fills ``exp.kl``, returns the KL statistics."""
    return kl_sums(exp, estimator).reduce(Dist())


def kl_sums(exp: Experience, estimator: Estimator, sums: MetricSums | None = None) -> MetricSums:
    """Fill ``exp.kl`` (per-token KL(π_old‖π_ref), the named estimator, in the KL's numerics)
    and return the per-response means of it, of k1 and of k3; with the sampler's log-probs also
    ``kl/sampler_trainer``: Σ_t k3 between the sampler's and the training forward's log-probs
    of the drawn tokens, which estimates KL(π_sampler‖π_train) per response (0 when the two
    compute the same distribution)."""
    pol = exp.policy_kl_logprobs
    if pol is None or exp.old_logprobs is None:
        raise ValueError("the behaviour log-probs are not known yet")
    resp, ref = exp.response_mask, exp.ref_logprobs
    exp.kl = torch.where(resp, estimate(pol, ref, estimator), 0.0)
    n_valid = float(exp.valid.sum())
    sums = MetricSums() if sums is None else sums
    sums.ratio(f"kl/{estimator}", masked_sum(exp.kl, resp, dim=-1).sum(), n_valid)
    for name, fn in (("kl/k1", k1), ("kl/k3", k3)):
        if name != f"kl/{estimator}":
            sums.ratio(name, masked_sum(fn(pol, ref), resp, dim=-1).sum(), n_valid)
    if exp.sampler_logprobs is not None:
        mismatch = k3(exp.sampler_logprobs, exp.old_logprobs)  # x ∼ sampler
        sums.ratio("kl/sampler_trainer", masked_sum(mismatch, resp, dim=-1).sum(), n_valid)
    return sums


def tis_weights(exp: Experience, idx: Tensor, cap: float | None) -> Tensor | None:
    """Rows ``idx``' truncated importance weights min(π_train/π_sampler, cap), or None when TIS
    is off or the sampler's log-probs are unknown."""
    if cap is None or exp.sampler_logprobs is None or exp.old_logprobs is None:
        return None
    return truncated_importance_weights(
        exp.old_logprobs[idx], exp.sampler_logprobs[idx], cap, exp.response_mask[idx]
    )


def noise_floor(exp: Experience, rows: Tensor, exact: Tensor) -> float:
    """Mean over ``rows`` of Σ_t k3 − Σ_t KL_exact per response: the sampled estimator against
    the exact KL on the same responses. It is sampling noise around 0 when the numerics are
    consistent, and grows with half-precision rounding noise (k3's bias ½·E[ε²] per token)."""
    pol = exp.policy_kl_logprobs
    if pol is None or rows.numel() == 0:
        return float("nan")
    return float(noise_floor_terms(exp, rows, exact).mean())


def noise_floor_terms(exp: Experience, rows: Tensor, exact: Tensor) -> Tensor:
    """(n,) Σ_t k3 − Σ_t KL_exact for each of ``rows`` (see :func:`noise_floor`)."""
    pol = exp.policy_kl_logprobs
    if pol is None:
        raise ValueError("the behaviour log-probs are not known yet")
    resp = exp.response_mask[rows]
    sampled = masked_sum(k3(pol[rows], exp.ref_logprobs[rows]), resp, dim=-1)  # (n,)
    return sampled - exact.to(sampled.device)


@dataclass
class ExactKL:
    """The exact KL on a few responses of a rollout (:func:`exact_kl`)."""

    rows: Tensor
    """(n,) the rollout rows it was computed on."""
    per_response: Tensor
    """(n,) Σ_t KL(π_θ(·|prefix) ‖ π_ref(·|prefix)) over each response, exact."""
    entropy: float
    """Mean per-token entropy of π_θ on those responses (nan if none)."""
    tokens: float = 0.0
    """The number of response tokens the entropy is averaged over."""

    @property
    def mean(self) -> float:
        return float(self.per_response.mean()) if self.rows.numel() else 0.0


@torch.no_grad()
def exact_kl(
    model: nn.Module,
    reference: ReferencePolicy,
    exp: Experience,
    n: int,
    temperature: float,
    numerics: Callable[[], Any] = contextlib.nullcontext,
) -> ExactKL:
    """On the first ``n`` valid responses, at the current θ, in ``numerics`` (fp32 in training): the
    per-response Σ_t KL(π_θ(·|prefix) ‖ π_ref(·|prefix)), exact over the vocabulary
    (:func:`tether.core.kl.exact_from_logits`), and the mean per-token entropy of π_θ."""
    rows = exp.valid.nonzero().squeeze(-1)[:n]
    if rows.numel() == 0:
        return ExactKL(rows, torch.zeros(0), float("nan"))
    ids, am = exp.input_ids[rows], exp.attention_mask[rows]
    mask = full_logprob_mask(exp.response_mask[rows], exp.prompt_length)
    base = unwrap_model(model)
    was = base.training
    base.eval()
    try:
        with numerics():
            pol = forward_logprobs(
                model, ids, am, mask=mask, temperature=temperature, return_logits=True
            )
            ref = reference.logprobs(ids, am, mask, temperature=temperature, return_logits=True)
    finally:
        base.train(was)
    per_pos = exact_from_logits(pol.logits, ref.logits.to(pol.logits.device), mask)
    logp = torch.log_softmax(pol.logits.float(), -1)  # (n, T−1, V): a handful of rows
    entropy = -(logp.exp() * logp).sum(-1)
    return ExactKL(rows, per_pos.sum(-1), float(masked_mean(entropy, mask)), float(mask.sum()))


def shaped_token_rewards(exp: Experience, beta: float, kl_in: KLPlacement) -> Tensor:
    """(N, R) per-token rewards: −β·KL_t on every response token (``kl_in="reward"``), plus the
    score on the last one (Ziegler et al. 2019 eq. 2; Stiennon et al. 2020)."""
    resp = exp.response_mask
    rewards = torch.zeros_like(exp.ref_logprobs)
    if kl_in == "reward" and beta > 0:
        rewards = rewards - beta * exp.kl
    last = (resp.long().cumsum(-1) == resp.sum(-1, keepdim=True)) & resp  # (N, R) last token
    rewards = rewards + last.float() * exp.scores[:, None]
    return torch.where(resp, rewards, 0.0)


def sequence_rewards(exp: Experience, beta: float, kl_in: KLPlacement) -> Tensor:
    """(N,) score − β·Σ_t KL_t (``kl_in="reward"``) or the score alone."""
    if kl_in == "reward" and beta > 0:
        return exp.scores - beta * masked_sum(exp.kl, exp.response_mask, dim=-1)
    return exp.scores.clone()


def kl_loss(
    logp: Tensor,
    ref_logp: Tensor,
    old_logp: Tensor,
    estimator: Estimator,
    mask: Tensor,
    kl_logp: Tensor | None = None,
) -> Tensor:
    """(n, R) per-token, β-free KL loss term ρ·k(π_θ, π_ref) with ρ = π_θ/π_old (see
    :func:`tether.core.kl.loss_term`: its expected gradient is ∇KL(π_θ‖π_ref) on- and
    off-policy); the caller multiplies by β and aggregates. With ``kl_logp`` (π_old's log-probs
    in the KL's numerics, the numerics ``ref_logp`` was computed in) the reference is carried
    into the training numerics (:func:`tether.core.kl.anchored_ref_logp`), so the log-ratio's
    value is the fp32 one on the first forward and only training-precision changes of π_θ
    since π_old add to it."""
    if kl_logp is not None:
        ref_logp = anchored_ref_logp(ref_logp, kl_logp, old_logp)
    per_token = loss_term(logp, ref_logp, estimator, behaviour_logp=old_logp)  # type: ignore[arg-type]
    return torch.where(mask, per_token, 0.0)


def build_reference(cfg: RLConfig, model: nn.Module) -> ReferencePolicy:
    if cfg.reference == "adapter" and cfg.peft is None:
        raise ValueError("reference=adapter needs a LoRA policy (set peft), or use reference=copy")
    return make_reference(cfg.reference, model)


def make_reward_fn(cfg: RLConfig) -> RewardFn:
    return make_reward(cfg.reward)


def aggregation_denominator(mode: str, mask: Tensor, dist: Dist | None = None) -> float:
    """The count :func:`tether.core.masked.aggregate` divides by for a whole mini-batch, so that
    its micro-batches' losses add up to the mini-batch loss; with ``dist``, the count over every
    process's share of the mini-batch (multiply the loss by ``dist.grad_scale`` before backward:
    gradients are averaged over processes).

    ``token_mean``: the response tokens; ``seq_mean`` and ``seq_sum``: the sequences with at least
    one response token (a sample skipped for an invalid reward has none and is not counted). The
    local counts are summed over processes first, then clamped to ≥ 1 (a mini-batch with nothing
    to count has a zero loss; the denominator only has to be positive and the same everywhere).

    Args:
        mode: the aggregation (``"token_mean" | "seq_mean" | "seq_sum"``).
        mask: (n, R) bool response mask of this process's rows of the mini-batch.
        dist: the process group (None: one process).
    """
    if mode == "token_mean":
        count = float(mask.sum())
    else:
        count = float(mask.any(-1).sum())  # (n, R) → non-empty rows
    if dist is not None:
        count = dist.sum_floats(count)[0]
    return max(count, 1.0)


def update_metrics(
    sums: MetricSums, dist: Dist, steps: int, losses: tuple[str, ...], local: dict[str, list[float]]
) -> dict[str, float]:
    """An update's logged metrics: ``losses`` (recorded as totals of micro-batch partial losses)
    per optimizer step, the other sums reduced over processes, and ``local`` lists of values that
    are the same on every process (e.g. the gradient norm after the all-reduce) averaged."""
    out = sums.reduce(dist)
    for name in losses:
        if name in out:
            out[name] /= max(steps, 1)
    out.update({k: sum(v) / len(v) for k, v in local.items() if v})
    return out


@dataclass
class RLSession:
    """Everything an RL trainer's update needs; built by :func:`train_loop`."""

    cfg: RLConfig
    accelerator: Any
    model: nn.Module
    module: Any
    """The prepared :class:`PolicyWithValue` (DDP-wrapped under multi-process)."""
    value_head: ValueHead | None
    optimizer: Any
    scheduler: Any
    reference: ReferencePolicy
    dist: Dist = field(default_factory=Dist)
    """The process group: reductions of the update's batch statistics (see
    :mod:`tether.train.distributed`)."""
    guard: StepGuard | None = None
    """Skips non-finite optimizer steps (:func:`tether.train.guards.guarded_optimizer_step`)."""


UpdateFn = Callable[[RLSession, Experience, float, int], dict[str, float]]


@torch.no_grad()
def post_update_kl(sess: RLSession, exp: Experience) -> float:
    """KL(π_θ‖π_ref) of the updated policy in nats per response (the controller's units),
    estimated on the rollout: per token ρ·k3 with ρ = π_θ/π_old (:func:`tether.core.kl.loss_term`:
    unbiased for each token's KL off-policy; the prefixes are π_old's), summed over each response
    and averaged over the valid responses of every process."""
    cfg, module = sess.cfg, sess.module
    rows = torch.arange(exp.size, device=exp.input_ids.device)
    chunk = max(1, exp.size // cfg.gradient_accumulation_steps)
    total = 0.0
    was = module.training
    module.eval()
    try:
        for start in range(0, exp.size, chunk):
            idx = rows[start : start + chunk]
            with sess.accelerator.autocast():
                logp, _, _ = module(**exp.rows(idx), temperature=cfg.temperature)
            mask = exp.response_mask[idx]
            per_token = kl_loss(
                logp.float(),
                exp.ref_logprobs[idx],
                exp.old_logprobs[idx],
                "k3",
                mask,
                None if exp.kl_logprobs is None else exp.kl_logprobs[idx],
            )
            total += float(masked_sum(per_token, mask))
    finally:
        module.train(was)
    kl_sum, n = sess.dist.sum_floats(total, float(exp.valid.sum()))
    return kl_sum / max(n, 1.0)


def kl_ceiling(
    sess: RLSession, exp: Experience, snapshot: UpdateSnapshot, step: int
) -> dict[str, float]:
    """``kl_max``: measure the updated policy's KL to the reference (:func:`post_update_kl`) and
    roll the update back (parameters, optimizer and LR schedule) when it exceeds the ceiling or
    is not finite. The same decision on every process (the KL is reduced)."""
    kl = post_update_kl(sess, exp)
    limit = sess.cfg.kl_max
    assert limit is not None
    out = {"kl/after_update": kl, "kl_max/rolled_back": 0.0}
    if not kl <= limit:
        snapshot.restore()
        out["kl_max/rolled_back"] = 1.0
        warnings.warn(
            f"step {step}: the update took the KL to the reference to {kl:.4g} nats > "
            f"kl_max={limit:g}; rolled back (parameters, optimizer and LR schedule as before it)",
            TetherWarning,
            stacklevel=2,
        )
    return out


def train_loop(
    cfg: RLConfig,
    update: UpdateFn,
    *,
    value_head: bool = False,
    optimize: Literal["all", "value_head"] = "all",
    optimizer_steps_per_iteration: int = 1,
    states: dict[str, Any] | None = None,
    after_update: Callable[[RLSession, Experience, dict[str, float]], None] | None = None,
    behaviour_logprobs: bool = True,
) -> dict[str, float]:
    """The on-policy loop every LM RL trainer runs; the algorithm is ``update``.

    Per iteration: a rollout (:func:`collect`, with critic values if ``value_head``), the exact
    KL on a subsample, ``update(session, experience, β, step)`` (advantages and the parameter
    update; returns metrics already reduced over processes), ``after_update`` (e.g. PPO-penalty's
    β_old rule), then the reference-KL controller sees the rollout's measured KL.

    Several processes: each samples its ``batch_size`` prompts of the global batch, every sequence
    from its own seed (:func:`tether.models.generation.sample_seeds`, so the global rollout is the
    one a single process would draw); rollout statistics and the KL are reduced over processes
    before the controller sees them (with the global number of samples), so β is the same on
    every process (checked at every checkpoint). Metrics, checkpoints (policy, value
    head, optimizer, scheduler, data cursor, reference, controllers and ``states``: objects with
    ``state_dict``/``load_state_dict``) and the final model are written as in every trainer.

    Args:
        cfg: the trainer's config.
        update: the algorithm.
        value_head: add a zero-initialised :class:`ValueHead` on the policy's hidden states.
        optimize: which parameters the AdamW optimizer owns: ``all`` trainable ones, or only the
            value head's (TRPO moves the policy by its natural-gradient step instead).
        optimizer_steps_per_iteration: for the LR schedule's length.
        states: extra resumable state, by name.
        after_update: called after ``update`` with the iteration's metrics (may add to them).
        behaviour_logprobs: run the behaviour forward in the rollout; False when ``update``
            fills ``experience.old_logprobs`` from its first forward (one on-policy step).
    """
    states = dict(states or {})
    acc = make_accelerator(cfg)
    if optimize == "value_head" and uses_fsdp2(cfg, acc):
        # (sharding=fsdp2 is refused by TRPO's config; an accelerate FSDP2 launch lands here)
        raise ConfigError(
            "an accelerate FSDP2 launch shards the parameters, which TRPO's natural-gradient "
            "step (double backward through the parameters) cannot use: launch with DDP"
        )
    run = start_run(cfg, acc)
    reward_fn = make_reward_fn(cfg)
    policy = load_trainable_policy(cfg)
    check_generation_fits(
        policy.model, cfg.max_prompt_length, cfg.max_new_tokens, model_name=cfg.model
    )
    tok = policy.tokenizer
    data, eval_prompts = split_heldout_prompts(
        cfg, tok, load_prompts(cfg, tok), cfg.batch_size * acc.num_processes
    )
    model = policy.model.to(acc.device)
    reference = build_reference(cfg, model)
    if cfg.kl_precision == "fp32":
        check_fp32_weights(unwrap_model(model), "policy")
    # The exact KL is the yardstick of the noise-floor metric: fp32 whatever kl_precision is
    # (a handful of responses), so that kl_precision=train shows its own noise floor.
    exact_numerics = (
        (lambda: fp32_numerics(acc.device.type))
        if weights_are_fp32(unwrap_model(model))
        else acc.autocast
    )
    controller = make_kl_controller(cfg)
    head = ValueHead(unwrap_model(model).config.hidden_size).to(acc.device) if value_head else None
    module = PolicyWithValue(model, head)
    if optimize == "value_head" and head is None:
        raise ValueError("optimize='value_head' needs value_head=True")
    module, optimizer, scheduler = prepare_training(
        acc,
        cfg,
        module,
        shard=model,
        shard_whole=() if head is None else (head,),
        reference=reference,
        optimize=head if optimize == "value_head" else None,
        total_steps=cfg.max_steps * optimizer_steps_per_iteration,
    )
    guard = StepGuard(cfg.max_bad_steps, run.path)
    watch = KLWatch(cfg.kl_target, cfg.kl_warn_factor, cfg.kl_warn_iterations, None)
    models: dict[str, Any] = {"policy": model}
    if head is not None:
        models["value_head"] = head
    step, restored = run.restore(models=models, optimizer=optimizer, scheduler=scheduler)
    cursor = DataCursor(len(data), cfg.batch_size, cfg.seed, acc.num_processes, acc.process_index)
    evaluator = make_evaluator(cfg, tok, eval_prompts, cfg.reward, run.path, acc)
    stateful = {
        "cursor": cursor,
        "reference": reference,
        "kl_controller": controller,
        "guard": guard,
        "kl_watch": watch,
        **states,
    }
    if evaluator is not None:
        stateful["evaluator"] = evaluator
    if restored:
        for name, obj in stateful.items():
            if name in restored:  # (a run resumed with held-out evaluation newly turned on)
                obj.load_state_dict(restored[name])
    dist = Dist(acc)
    session = RLSession(cfg, acc, model, module, head, optimizer, scheduler, reference, dist, guard)
    sharded = params_sharded(acc, model)
    sampler_weights = rollout_weights(
        model, cfg.rollout_dtype, resolve_mixed_precision(cfg.mixed_precision), sharded=sharded
    )

    final: dict[str, float] = {}
    save_best = save_policy_to(model, tok)
    with Progress(
        cfg.max_steps, initial=step, metrics=("score", "kl/k1", "beta"), accelerator=acc
    ) as bar:
        if evaluator is not None:
            evaluator.note = bar.note
            if step == 0:
                final.update(evaluator.evaluate(model, reference, 0, acc.autocast))
                evaluator.track(0, final, save_best)
                run.log(0, final)
                bar.exclude(final["eval/seconds"])
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            guard.step = step + 1
            examples = [data[i] for i in cursor.next_indices()]
            n_local = cfg.rollout_size
            exp = collect(
                model,
                tok,
                reference,
                reward_fn,
                examples,
                cfg,
                acc.autocast,
                module if head is not None else None,
                behaviour_logprobs=behaviour_logprobs,
                sampler_weights=sampler_weights,
                seeds=sample_seeds(cfg.seed, step, dist.rank * n_local, n_local),
                synced_processes=sharded,
                step=step + 1,
            )
            beta = controller.beta
            sums = exp.sums
            exact = None
            t_exact = time.perf_counter()
            if cfg.exact_kl_samples:
                exact = exact_kl(
                    model,
                    reference,
                    exp,
                    cfg.exact_kl_samples,
                    cfg.temperature,
                    exact_numerics,
                )
                sums.ratio("kl/exact", exact.per_response.sum(), float(exact.rows.numel()))
                if exact.tokens:
                    sums.ratio("entropy", exact.entropy * exact.tokens, exact.tokens)
            metrics = {"beta": beta, "exact_kl_s": time.perf_counter() - t_exact}
            rollout_ok = all_finite(acc, exp.scores[exp.valid], exp.kl)
            t_update = time.perf_counter()
            if rollout_ok:
                snapshot = (
                    UpdateSnapshot(module, optimizer, scheduler) if cfg.kl_max is not None else None
                )
                metrics.update(update(session, exp, beta, step))
                if snapshot is not None:
                    metrics.update(kl_ceiling(session, exp, snapshot, step + 1))
            else:
                guard.skip("a non-finite reward or KL in the rollout")
            metrics["update_s"] = time.perf_counter() - t_update  # forward/backward/optimizer
            if exp.kl is None and rollout_ok:  # the update supplied the behaviour log-probs
                kl_sums(exp, cfg.kl_estimator, sums)
            if exact is not None and exact.rows.numel():
                floor = noise_floor_terms(exp, exact.rows, exact.per_response)
                sums.ratio("kl/k3_minus_exact", floor.sum(), float(floor.numel()))
            reduced = sums.reduce(dist)  # every process: the global rollout's statistics
            metrics.update(finish_stats(reduced))
            if after_update is not None and rollout_ok:
                after_update(session, exp, metrics)
            observed = metrics.get(f"kl/{cfg.kl_estimator}", math.nan)
            if math.isfinite(observed):
                controller.update(max(observed, 0.0), n_steps=n_local * dist.world)
                watch.observe(step + 1, observed, controller.beta)
            elif rollout_ok:  # the update filled in a non-finite behaviour KL
                guard.skip("a non-finite KL to the reference")
            metrics.update(guard.metrics())
            if step + 1 == cfg.max_steps:  # what each process held (collective)
                metrics.update(memory_metrics(dist, module, optimizer))
            step += 1
            metrics["lr"] = scheduler.get_last_lr()[0]
            metrics["s_per_step"] = time.perf_counter() - t0  # the step, before eval/checkpoint
            metrics["tokens_per_s"] = reduced["_tokens"] / metrics["s_per_step"]
            evaluated = evaluator is not None and (evaluator.due(step) or step == cfg.max_steps)
            if evaluated:
                metrics.update(evaluator.evaluate(model, reference, step, acc.autocast))
                evaluator.track(step, metrics, save_best)
            final.update(metrics)
            if evaluated or step % cfg.logging_steps == 0 or step == cfg.max_steps:
                run.log(step, metrics)
            bar.update(step, metrics)
            stop = evaluator is not None and evaluator.should_stop
            if (cfg.save_steps and step % cfg.save_steps == 0) or step == cfg.max_steps or stop:
                for name, obj in stateful.items():
                    if isinstance(obj, KLController) or name.endswith("controller"):
                        check_same(dist, name, obj.state_dict())
                saved: dict[str, Any] = {"policy": model_state_for_checkpoint(model)}
                if head is not None:
                    saved["value_head"] = head
                run.save(
                    step,
                    models=saved,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    states={name: obj.state_dict() for name, obj in stateful.items()},
                )
            if stop:
                break
    run.write_final(save_best, models={"policy": model})
    run.close()
    return final
