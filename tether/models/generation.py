"""Sampling rollouts with the KV cache, with masks and behaviour log-probs.

Layout of a :class:`Rollout` for B prompts left-padded to P tokens and R generated positions::

    input_ids       (B, P+R)  [pad.. prompt | response .. EOS pad..]
    attention_mask  (B, P+R)  True on real prompt tokens and on the response up to its first EOS
    response_ids    (B, R)    the generated tokens (pad after EOS)
    response_mask   (B, R)    True on generated tokens up to and including the first EOS
    logprobs        (B, R)    log π_θ,T(response token) from the *training* forward

Behaviour log-probs and the sampling distribution. The trainer's policy is π_θ at the sampling
temperature T, π_θ,T ∝ exp(logits/T), which is what :func:`forward_logprobs` computes with the
same ``temperature``; ``logprobs`` are recomputed with that training forward after sampling, so the
PPO ratio is exactly 1 before the first update (KV-cache decoding and a full forward differ by
float rounding only). Top-k / top-p truncation is *not* part of π_θ,T: with them the tokens come
from a renormalised, truncated distribution whose log-probs, ``sampler_logprobs`` (from the
processed generation scores), are ≥ ``logprobs``. The gap is the off-policy error that every
RLHF framework accepts when it samples with top-p; ``sampler_logprobs`` lets you measure it.

Per-sample seeds (``row_seeds``). By default the tokens come from torch's global RNG, so a sample
depends on which process drew it and on the rest of its batch. With one seed per row, each row
draws its token by the Gumbel-max trick from its own generator (argmax of log p + Gumbel noise is
an exact sample of p; Gumbel 1954, as in Kool et al. 2019): the sample is a function of the seed
and the model alone, so a global batch split over N processes is sampled as on one process
(:func:`sample_seeds` derives the seeds from the run seed, the step and the global sample index).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tether.data.collate import pad_sequences
from tether.models.logprobs import forward_logprobs, position_ids_from_mask, unwrap_model


@dataclass
class SamplingConfig:
    """How rollouts are sampled."""

    max_new_tokens: int = 64
    """Response length cap R (tokens); responses without EOS by then are cut."""
    temperature: float = 1.0
    """Softmax temperature T; the trained policy is π_θ at this temperature."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    do_sample: bool = True
    """Sample (True) or decode greedily (False)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Rollout:
    """Sampled responses with masks and log-probs; see the module docstring for the layout."""

    input_ids: Tensor
    attention_mask: Tensor
    prompt_length: int
    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor | None
    """(B, R) behaviour log-probs from the training forward; None if not asked for."""
    sampler_logprobs: Tensor | None
    """(B, R) log-probs under the sampler's processed distribution; None if not asked for."""
    finished: Tensor
    """(B,) bool: the response ended with EOS (False: cut at max_new_tokens)."""

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(-1)


def response_mask_from_ids(response_ids: Tensor, eos_token_ids: list[int]) -> tuple[Tensor, Tensor]:
    """(B, R) generated ids → (B, R) mask, True up to and including the first EOS, and (B,)
    finished flags."""
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for e in eos_token_ids:
        is_eos |= response_ids == e
    # number of EOS strictly before each position: 0 → still inside the response
    before = is_eos.long().cumsum(-1) - is_eos.long()
    return before == 0, is_eos.any(-1)


class _SamplerLogProbs:
    """A logits processor, placed after every other one, that records the sampler's log-prob of
    each token it draws: at each decoding step it gathers the previous step's processed
    log-softmax (temperature, top-k, top-p applied) at the token that step drew, which is the
    last column of ``input_ids`` by now. Memory O(B·V) for one step, not O(B·R·V) for the whole
    rollout as ``output_scores`` keeps."""

    def __init__(self) -> None:
        self.prev: Tensor | None = None  # (B, V) log-softmax of the last processed scores
        self.prev_len = 0  # the sequence length when it was taken: its token's column
        self.gathered: list[Tensor] = []  # (B,) per step

    def _gather(self, ids: Tensor) -> None:
        if self.prev is not None and ids.shape[1] > self.prev_len:
            tok = ids[:, self.prev_len]  # (B,) the token drawn from self.prev
            self.gathered.append(self.prev.gather(-1, tok[:, None]).squeeze(-1))
            self.prev = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._gather(input_ids)
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        self.prev_len = input_ids.shape[1]
        return scores

    def result(self, sequences: Tensor, prompt_length: int) -> Tensor:
        """(B, R') log-probs of ``sequences[:, prompt_length:]`` (steps undone by a deferred stop
        check are dropped)."""
        self._gather(sequences)
        r = sequences.shape[1] - prompt_length
        out = torch.stack(self.gathered, dim=1) if self.gathered else sequences.new_zeros(0)
        return out[:, :r].float()


def sample_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of global sample ``index`` of iteration ``step`` of a run with ``seed``:
    a hash of the three, so a sample gets the same seed whichever process draws it and however
    the global batch is split."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_seeds(seed: int, step: int, start: int, n: int) -> list[int]:
    """:func:`sample_seed` of the global samples ``start … start + n − 1``."""
    return [sample_seed(seed, step, i) for i in range(start, start + n)]


class _RowSeededSampler:
    """A logits processor, placed last, that draws each row's token by Gumbel-max from the row's
    own generator and returns scores that put all the mass on it (−inf elsewhere), so the
    generation loop's multinomial draw is deterministic. Every step draws V uniforms per row,
    whether or not the row has finished, so a row's noise depends only on its seed and step."""

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.generators = []
        for seed in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(int(seed))
            self.generators.append(g)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(
                f"{len(self.generators)} row seeds for a batch of {scores.shape[0]} rows"
            )
        v = scores.shape[-1]
        noise = torch.stack(
            [
                torch.rand(v, generator=g, device=scores.device, dtype=torch.float64)
                for g in self.generators
            ]
        )  # (B, V) uniforms in [0, 1)
        gumbel = -torch.log(-torch.log(noise.clamp(min=1e-300)))
        logp = torch.log_softmax(scores.double(), dim=-1)
        choice = (logp + gumbel).argmax(-1)  # (B,)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, choice[:, None], 0.0)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    sampling: SamplingConfig,
    generator_seed: int | None = None,
    compute_logprobs: bool = True,
    compute_sampler_logprobs: bool = True,
    sampler: Any = None,
    row_seeds: Sequence[int] | None = None,
    synced_processes: bool = False,
) -> Rollout:
    """Sample one response per prompt with the KV cache and recompute behaviour log-probs.

    Args:
        model: HF causal LM (PEFT/DDP wrappers are unwrapped for sampling).
        tokenizer: its tokenizer (pad and EOS ids).
        prompt_ids: B prompts as token-id lists (no padding).
        sampling: :class:`SamplingConfig`.
        generator_seed: if given, seeds torch's RNG for this call (reproducible rollouts).
        compute_logprobs: recompute the behaviour log-probs with the training forward (False
            skips that forward, for a caller whose first training forward at θ_old gives them).
        compute_sampler_logprobs: record the sampler's own log-prob of every drawn token
            (``sampler_logprobs``; one (B, V) buffer while generating).
        sampler: the model that draws the tokens, if not ``model`` (e.g. the half-precision
            copy of :class:`tether.models.rollout.RolloutWeights`); the behaviour log-probs
            still come from ``model``'s training forward.
        row_seeds: one seed per prompt: each row samples from its own generator (Gumbel-max),
            independently of the batch and the process (see :func:`sample_seeds`).
        synced_processes: keep decoding until every process's batch has finished (HF's
            ``synced_gpus``): needed when the parameters are sharded (FSDP, ZeRO-3), whose every
            forward is a collective that all processes must join.
    """
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate needs at least one prompt and no empty prompt")
    gen_model = model if sampler is None else sampler
    if hasattr(gen_model, "module"):
        gen_model = gen_model.module
    device = next(unwrap_model(model).parameters()).device
    pad_id = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    ids, mask = pad_sequences(prompt_ids, pad_id, side="left")
    ids, mask = ids.to(device), mask.to(device)
    p = ids.shape[1]
    kwargs: dict[str, Any] = dict(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sampling.do_sample,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        return_dict_in_generate=True,
        use_cache=True,
    )
    if synced_processes:
        kwargs["synced_gpus"] = True
    # The sampling warpers are passed as our own processors (HF's classes, HF's order) so that
    # the recorder runs after them: HF puts its own warpers after any custom processor.
    kwargs.update(temperature=None, top_k=None, top_p=None)
    processors = LogitsProcessorList()
    if sampling.do_sample:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            processors.append(TopKLogitsWarper(top_k=sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=sampling.top_p))
    recorder = _SamplerLogProbs() if compute_sampler_logprobs else None
    if recorder is not None:
        processors.append(recorder)
    if row_seeds is not None and sampling.do_sample:
        if len(row_seeds) != len(prompt_ids):
            raise ValueError(f"{len(row_seeds)} row seeds for {len(prompt_ids)} prompts")
        processors.append(_RowSeededSampler(row_seeds, device))
    if processors:
        kwargs["logits_processor"] = processors
    was_training = gen_model.training
    gen_model.eval()
    try:
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        out = gen_model.generate(input_ids=ids, attention_mask=mask.long(), **kwargs)
    finally:
        gen_model.train(was_training)
    seq = out.sequences  # (B, P+R')
    response = seq[:, p:]  # (B, R')
    response_mask, finished = response_mask_from_ids(response, eos_ids)
    response = torch.where(response_mask, response, pad_id)
    input_ids = torch.cat([ids, response], dim=1)  # (B, P+R)
    attention_mask = torch.cat([mask, response_mask], dim=1)  # (B, P+R)

    sampler_lp = None
    if recorder is not None:
        sampler_lp = recorder.result(seq, p)  # (B, R)
        sampler_lp = torch.where(response_mask, sampler_lp, 0.0)

    logprobs = None
    if compute_logprobs:
        was_training = model.training
        model.eval()  # behaviour log-probs without dropout, as the policy that sampled
        try:
            full = forward_logprobs(
                model,
                input_ids,
                attention_mask,
                mask=torch.cat([torch.zeros_like(mask[:, 1:]), response_mask], dim=1),
                temperature=sampling.temperature if sampling.do_sample else 1.0,
                position_ids=position_ids_from_mask(attention_mask),
            )
        finally:
            model.train(was_training)
        logprobs = full.logprobs[:, p - 1 :]  # (B, R): position P−1 predicts response token 1
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_length=p,
        response_ids=response,
        response_mask=response_mask,
        logprobs=logprobs,
        sampler_logprobs=sampler_lp,
        finished=finished,
    )
