"""Best-of-N sampling, and its KL to the base policy: the analytic value and a measured one.

Best-of-n (BoN) draws n completions y_1..y_n ∼ π(·|x) and keeps the one with the highest reward.
It is the simplest reward optimiser and the yardstick for RL: Gao et al. 2022 ("Scaling Laws for
Reward Model Overoptimization", arXiv:2210.10760) plot gold reward against KL for BoN and for PPO
on the same axis. Here π is the *sampling* distribution (the model at the sampling temperature,
with any top-k / top-p truncation), and ties in the reward go to the first sample, which is a
uniformly random one of the tied samples because the samples are exchangeable.

The KL of BoN. With F(t) = P_{y∼π}(r(y) ≤ t) the reward's CDF under π and F(t⁻) = P(r(y) < t),
the BoN distribution reweights π by a function of the reward alone::

    π_BoN(y) = π(y) · w(r(y)),   w(t) = (F(t)ⁿ − F(t⁻)ⁿ) / (F(t) − F(t⁻)),

since the best of n has reward level t with probability F(t)ⁿ − F(t⁻)ⁿ and, within a level,
is distributed as π. Hence KL(π_BoN ‖ π) = E_{y∼π_BoN}[log w(r(y))]. For a continuous reward
(no ties) w(t) = n F(t)ⁿ⁻¹, and since F(r(y)) ∼ Beta(n, 1) under π_BoN the KL is exactly
log n − (n − 1)/n (Stiennon et al. 2020, arXiv:2009.01325 App. G.3; Gao et al. 2022 §2; see
:func:`tether.core.kl.best_of_n_kl`). With ties it is smaller: that value is then only an upper
bound (Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy",
arXiv:2401.01879). Ties are common in practice: VADER scores every text without a lexicon word
exactly 0, and in the extreme case where every completion ties, BoN *is* π and the KL is 0. Ties
near the top of the reward distribution (a saturated reward) lower the KL most; ties that the
best of n rarely reaches barely change it.

Measuring it: :func:`bon_kl_estimate`. For each prompt, m further independent samples of π (the
*calibration* samples) estimate F. Pool them with the BoN pick r; with L calibration rewards
below r and E equal to it, the pooled empirical CDF gives F̂(r) = (L + E + 1)/(m + 1) and
F̂(r⁻) = L/(m + 1), always F̂(r) > F̂(r⁻), so the plug-in log ŵ is finite. Without ties,
[F̂(r⁻), F̂(r)] is the pick's rank cell, centred on its mid-rank (L + ½)/(m + 1), and log ŵ is the
log of n Fⁿ⁻¹ averaged over that cell; with ties the cell widens to the whole tied block, which is
the exact w above. The per-prompt estimate is log ŵ at that prompt's pick (one draw from π_BoN);
their mean over prompts estimates the prompt-averaged KL, with the standard error of that mean.

Bias. For a continuous reward the estimate is biased *low*, never high, in expectation: the rank
K = L is what the estimator sees of y, and under π it is uniform on {0..m}, so
E[log ŵ] = KL(p_K ‖ U) − KL(p_K ‖ q) ≤ KL(p_K ‖ U) ≤ KL(π_BoN ‖ π) by the data-processing
inequality (p_K: the law of K under π_BoN; q(k) = ŵ(k)/(m + 1), a distribution on {0..m}). To
first order in 1/m the bias is −(n − 1)/(2m) (:func:`first_order_bias`); e.g. for n = 8 the
expected estimate is 1.004 with m = 16 and 1.151 with m = 64, against 1.204. With ties ŵ is
consistent as m → ∞.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tether.core.kl import best_of_n_kl
from tether.models import SamplingConfig, generate
from tether.rewards import RewardFn, call_reward

DEFAULT_CALIBRATION = 16
"""Calibration samples per prompt for the KL estimate; bias ≈ −(n − 1)/(2m), see the module."""

DEFAULT_BATCH_SIZE = 64
"""Sequences per ``generate`` call."""


@dataclass(frozen=True)
class KLEstimate:
    """A Monte-Carlo estimate of KL(π_BoN ‖ π), averaged over prompts.

    Attributes:
        per_prompt: one single-draw estimate per prompt (each may be negative; their mean
            estimates a KL ≥ 0).
        mean: their mean.
        stderr: the standard error of the mean (sample std / √P); NaN with fewer than 2 prompts.
    """

    per_prompt: tuple[float, ...]
    mean: float
    stderr: float


def bon_kl_estimate(
    pick_rewards: Sequence[float],
    calibration_rewards: Sequence[Sequence[float]],
    n: int,
) -> KLEstimate:
    """Estimate KL(π_BoN ‖ π) from each prompt's BoN pick and independent calibration rewards.

    Per prompt, with L (E) the number of calibration rewards below (equal to) the pick's reward r
    and m the number of calibration rewards, a = (L + E + 1)/(m + 1), b = L/(m + 1) and t = b/a::

        log ŵ = log((aⁿ − bⁿ)/(a − b)) = (n − 1) log a + log(1 − tⁿ) − log(1 − t).

    See the module docstring for the derivation and the bias (low by ≈ (n − 1)/(2m) for a
    continuous reward). Pure: no model, rewards in, estimate out.

    Args:
        pick_rewards: (P,) the reward of each prompt's best-of-n pick.
        calibration_rewards: (P, m_p) for each prompt, rewards of m_p ≥ 1 samples of π drawn
            independently of its n BoN candidates.
        n: the number of candidates BoN chose from.

    Raises:
        ValueError: mismatched lengths, an empty calibration row, a non-finite reward, n < 1.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer ≥ 1, got {n!r}")
    if len(pick_rewards) != len(calibration_rewards):
        raise ValueError(
            f"{len(pick_rewards)} pick rewards but {len(calibration_rewards)} calibration rows; "
            "expected one row per prompt"
        )
    if len(pick_rewards) == 0:
        raise ValueError("bon_kl_estimate needs at least one prompt")
    estimates = []
    for i, (r, row) in enumerate(zip(pick_rewards, calibration_rewards, strict=True)):
        calib = np.asarray(row, dtype=np.float64)  # (m,)
        if calib.ndim != 1 or calib.size == 0:
            raise ValueError(f"calibration rewards of prompt {i} must be a non-empty 1-D sequence")
        if not (math.isfinite(r) and np.isfinite(calib).all()):
            raise ValueError(f"prompt {i}: rewards must be finite")
        below = int(np.count_nonzero(calib < r))
        equal = int(np.count_nonzero(calib == r))
        cells = calib.size + 1
        a = (below + equal + 1) / cells
        t = below / (below + equal + 1)  # b / a, in [0, 1)
        estimates.append((n - 1) * math.log(a) + math.log1p(-(t**n)) - math.log1p(-t))
    values = np.asarray(estimates)  # (P,)
    stderr = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan
    return KLEstimate(tuple(estimates), float(values.mean()), stderr)


def first_order_bias(n: int, calibration: int) -> float:
    """The leading bias of :func:`bon_kl_estimate` for a continuous reward: −(n − 1)/(2m).

    From log F̂ ≈ log F + (F̂ − F)/F − (F̂ − F)²/(2F²) with F̂ the mid-rank CDF of m samples:
    E[log F̂ − log F] = −1/(2m) + O(m⁻²) whatever F, times the n − 1 in log(n Fⁿ⁻¹).
    """
    return -(n - 1) / (2 * calibration)


@dataclass(frozen=True)
class BoNResult:
    """What :func:`best_of_n` sampled, picked and measured; lists are indexed by prompt.

    Attributes:
        n: candidates per prompt.
        calibration: further samples per prompt for the KL estimate.
        prompts: (P,) the prompt texts the reward function saw.
        samples: (P, n) the candidate completions.
        rewards: (P, n) their rewards.
        picks: (P,) index of the chosen candidate: the first argmax of its row of ``rewards``.
        kl_bound: log n − (n − 1)/n, the KL for a reward without ties (an upper bound).
        kl: the Monte-Carlo estimate of KL(π_BoN ‖ π), see :func:`bon_kl_estimate`.
        gold: name → (P, n) rewards of the candidates under each *gold* reward: measured on the
            same samples, never used to pick (held-out evaluation of what the pick buys).
    """

    n: int
    calibration: int
    prompts: list[str]
    samples: list[list[str]]
    rewards: list[list[float]]
    picks: list[int]
    kl_bound: float
    kl: KLEstimate
    gold: dict[str, list[list[float]]] = field(default_factory=dict)

    @property
    def completions(self) -> list[str]:
        """(P,) the chosen completions."""
        return [row[j] for row, j in zip(self.samples, self.picks, strict=True)]

    @property
    def pick_rewards(self) -> list[float]:
        """(P,) the rewards of the chosen completions."""
        return [row[j] for row, j in zip(self.rewards, self.picks, strict=True)]

    @property
    def mean_reward_bon(self) -> float:
        """Mean reward of the picks: the estimate of E_{π_BoN}[r]."""
        return float(np.mean(self.pick_rewards))

    @property
    def mean_reward_plain(self) -> float:
        """Mean reward of all P·n candidates: the estimate of E_π[r] (≤ ``mean_reward_bon``)."""
        return float(np.mean(self.rewards))

    def gold_bon(self, name: str) -> float:
        """Mean gold reward ``name`` of the picks: E_{π_BoN}[r_gold]."""
        return float(np.mean([row[j] for row, j in zip(self.gold[name], self.picks, strict=True)]))

    def gold_plain(self, name: str) -> float:
        """Mean gold reward ``name`` of all candidates: E_π[r_gold]."""
        return float(np.mean(self.gold[name]))

    def proxy_gold_gap(self, name: str) -> float:
        """What best-of-n gains on the proxy minus what it gains on gold ``name``, each in units
        of its spread over the plain samples (:func:`tether.eval.heldout.standardised_gap`,
        with π's samples as the baseline): large when the pick chases the proxy alone."""
        from tether.eval.heldout import mean_std, standardised_gap

        proxy = mean_std([v for row in self.rewards for v in row])
        gold = mean_std([v for row in self.gold[name] for v in row])
        return standardised_gap(self.mean_reward_bon, self.gold_bon(name), proxy, gold)


def sample_texts(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    seed: int | None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[str]:
    """One completion per entry of ``prompt_ids`` (repeat a prompt for several), ``batch_size``
    per ``generate`` call, torch's RNG seeded once before the first; decoded without special
    tokens. No log-probs are computed."""
    texts: list[str] = []
    for s in range(0, len(prompt_ids), batch_size):
        rollout = generate(
            model,
            tokenizer,
            [list(p) for p in prompt_ids[s : s + batch_size]],
            sampling,
            generator_seed=seed if s == 0 else None,
            compute_logprobs=False,
            compute_sampler_logprobs=False,
        )
        texts.extend(
            tokenizer.decode(ids[mask], skip_special_tokens=True)
            for ids, mask in zip(rollout.response_ids, rollout.response_mask, strict=True)
        )
    return texts


def best_of_n(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    reward_fn: RewardFn,
    n: int,
    sampling: SamplingConfig,
    *,
    calibration: int = DEFAULT_CALIBRATION,
    seed: int | None = None,
    prompts: Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    gold_rewards: Mapping[str, RewardFn] | None = None,
) -> BoNResult:
    """Best-of-n for each prompt, with the KL to the sampling policy bounded and estimated.

    For each prompt, n + ``calibration`` completions are sampled from ``model`` with
    ``sampling`` (the prompts repeated and batched, ``batch_size`` sequences per ``generate``
    call), decoded with special tokens skipped, and scored together by ``reward_fn``. The first n
    are the candidates, of which the highest-reward one is picked; the rest calibrate
    :func:`bon_kl_estimate`.

    Args:
        model: HF causal LM (the base policy π).
        tokenizer: its tokenizer.
        prompt_ids: (P,) prompts as token-id lists (``PromptExample.prompt_ids``).
        reward_fn: ``(prompts, completions) -> rewards``, e.g. from
            :func:`tether.rewards.make_reward`; its output is checked with
            :func:`tether.rewards.call_reward` (a non-finite reward, or an exception in it, is a
            :class:`~tether.rewards.RewardError` naming the sample).
        n: candidates per prompt (≥ 1).
        sampling: how to sample; π is this sampling distribution. Must sample (``do_sample``).
        calibration: further samples per prompt for the KL estimate (≥ 1); more shrinks its
            bias, ≈ −(n − 1)/(2·calibration) for a continuous reward.
        seed: seeds torch's RNG before the first ``generate`` call (reproducible results).
        prompts: (P,) the prompt texts given to ``reward_fn`` (``PromptExample.prompt``);
            default: ``prompt_ids`` decoded with special tokens kept.
        batch_size: sequences per ``generate`` call.
        gold_rewards: name → reward function, measured on the n candidates (never used to
            pick): :attr:`BoNResult.gold`.

    Returns:
        A :class:`BoNResult`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer ≥ 1, got {n!r}")
    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 1:
        raise ValueError(f"calibration must be an integer ≥ 1, got {calibration!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if not sampling.do_sample:
        raise ValueError("best-of-n needs sampling (do_sample=True): greedy candidates are equal")
    if len(prompt_ids) == 0:
        raise ValueError("best_of_n needs at least one prompt")
    if prompts is None:
        prompts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids]
    elif len(prompts) != len(prompt_ids):
        raise ValueError(f"got {len(prompts)} prompt texts for {len(prompt_ids)} prompt_ids")

    per_prompt = n + calibration
    flat_ids = [list(p) for p in prompt_ids for _ in range(per_prompt)]  # (P·(n+m),)
    texts = sample_texts(model, tokenizer, flat_ids, sampling, seed, batch_size)
    flat_prompts = [p for p in prompts for _ in range(per_prompt)]
    flat_rows = [i for i in range(len(prompt_ids)) for _ in range(per_prompt)]
    scores = call_reward(reward_fn, flat_prompts, texts, rows=flat_rows, stage="best-of-n")
    r = np.asarray(scores.values).reshape(len(prompt_ids), per_prompt)  # (P, n+m)
    candidates, calib = r[:, :n], r[:, n:]  # (P, n), (P, m)
    picks = candidates.argmax(axis=1)  # (P,) first maximum
    gold: dict[str, list[list[float]]] = {}
    cand_texts = [texts[i * per_prompt + j] for i in range(len(prompt_ids)) for j in range(n)]
    cand_prompts = [p for p in prompts for _ in range(n)]
    for name, fn in (gold_rewards or {}).items():
        g = call_reward(
            fn,
            cand_prompts,
            cand_texts,
            name,
            rows=[i for i in range(len(prompt_ids)) for _ in range(n)],
            stage="best-of-n (gold reward)",
        )
        gold[name] = np.asarray(g.values).reshape(len(prompt_ids), n).tolist()
    return BoNResult(
        n=n,
        calibration=calibration,
        prompts=list(prompts),
        samples=[texts[i * per_prompt : i * per_prompt + n] for i in range(len(prompt_ids))],
        rewards=candidates.tolist(),
        picks=picks.tolist(),
        kl_bound=best_of_n_kl(n),
        kl=bon_kl_estimate(candidates[np.arange(len(picks)), picks], calib, n),
        gold=gold,
    )
