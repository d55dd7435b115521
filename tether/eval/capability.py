"""Capability retention: the policy's per-token negative log-likelihood on held-out general text.

RL against a narrow reward can cost what the reference knew (the "alignment tax"). Its simplest
measure is the mean per-token NLL of general text under π_θ next to π_ref's on the same text:
``nll − ref_nll`` > 0 is the tax. Computed with tether's chunked log-probs (no (B, T, V) fp32
tensor), in fp32 numerics by default, token-weighted over the whole corpus.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tether.data.collate import pad_sequences
from tether.models.logprobs import forward_logprobs, unwrap_model
from tether.models.numerics import fp32_numerics


@dataclass(frozen=True)
class NLL:
    """Mean per-token NLL (nats) over ``tokens`` predicted tokens."""

    mean: float
    tokens: int


LogProbFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(input_ids (B, T), attention_mask (B, T), mask (B, T−1)) -> log-probs (B, T−1)``."""


@torch.no_grad()
def corpus_nll_of(
    logprobs: LogProbFn,
    device: torch.device,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int = 256,
) -> NLL:
    """Token-weighted mean of −log π(x_t | x_<t) over every text (each from its 2nd token; texts
    cut at ``max_length`` tokens) under the log-prob function ``logprobs``, in fp32 numerics."""
    if not texts:
        raise ValueError("corpus_nll needs at least one text")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    if any(len(x) < 2 for x in ids):
        raise ValueError("every text must have at least 2 tokens")
    total, count = 0.0, 0
    for s in range(0, len(ids), batch_size):
        batch, mask = pad_sequences(ids[s : s + batch_size], tokenizer.pad_token_id, "right")
        batch, mask = batch.to(device), mask.to(device)
        pred = mask[:, 1:] & mask[:, :-1]  # (B, T−1): both tokens real
        with fp32_numerics(device.type):
            lp = logprobs(batch, mask, pred)  # (B, T−1)
        total += float(-lp[pred].double().sum())
        count += int(pred.sum())
    return NLL(total / count, count)


@torch.no_grad()
def corpus_nll(
    model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8, max_length: int = 256
) -> NLL:
    """:func:`corpus_nll_of` under ``model``, in eval mode."""
    base = unwrap_model(model)
    was = base.training
    base.eval()
    try:
        return corpus_nll_of(
            lambda ids, am, m: forward_logprobs(model, ids, am, mask=m).logprobs,
            next(base.parameters()).device,
            tokenizer,
            texts,
            batch_size,
            max_length,
        )
    finally:
        base.train(was)
