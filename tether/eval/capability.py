"""Capability retention: the policy's per-token negative log-likelihood on held-out general text.

RL against a narrow reward can cost what the reference knew (the "alignment tax"). Its simplest
measure is the mean per-token NLL of general text under π_θ next to π_ref's on the same text:
``nll − ref_nll`` > 0 is the tax. Computed with tether's chunked log-probs (no (B, T, V) fp32
tensor), in fp32 numerics by default, token-weighted over the whole corpus.
"""

from __future__ import annotations

from collections.abc import Sequence
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


@torch.no_grad()
def corpus_nll(
    model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8, max_length: int = 256
) -> NLL:
    """Token-weighted mean of −log π(x_t | x_<t) over every text (each from its 2nd token; texts
    cut at ``max_length`` tokens), in eval mode and fp32 numerics."""
    if not texts:
        raise ValueError("corpus_nll needs at least one text")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    if any(len(x) < 2 for x in ids):
        raise ValueError("every text must have at least 2 tokens")
    base = unwrap_model(model)
    device = next(base.parameters()).device
    was = base.training
    base.eval()
    total, count = 0.0, 0
    try:
        for s in range(0, len(ids), batch_size):
            batch, mask = pad_sequences(ids[s : s + batch_size], tokenizer.pad_token_id, "right")
            batch, mask = batch.to(device), mask.to(device)
            pred = mask[:, 1:] & mask[:, :-1]  # (B, T−1): both tokens real
            with fp32_numerics(device.type):
                lp = forward_logprobs(model, batch, mask, mask=pred).logprobs  # (B, T−1)
            total += float(-lp[pred].double().sum())
            count += int(pred.sum())
    finally:
        base.train(was)
    return NLL(total / count, count)
