"""Padding and collation. Masks are explicit BoolTensors (True = real token); pad ids never
double as masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor


def pad_sequences(
    seqs: Sequence[Sequence[int]],
    pad_value: int,
    side: Literal["left", "right"] = "right",
    length: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Pad token-id lists to one length.

    Args:
        seqs: B sequences of token ids.
        pad_value: id written into padding (never read back as a mask).
        side: ``"left"`` for generation prompts, ``"right"`` for training batches.
        length: pad to this length (≥ the longest sequence); default the longest.

    Returns:
        ``(ids, mask)``: LongTensor (B, L) and BoolTensor (B, L), True on real tokens.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    longest = max((len(s) for s in seqs), default=0)
    if length is None:
        length = longest
    elif length < longest:
        raise ValueError(f"length {length} is shorter than the longest sequence ({longest})")
    ids = torch.full((len(seqs), length), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s)
        if n == 0:
            continue
        sl = slice(length - n, length) if side == "left" else slice(0, n)
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = True
    return ids, mask
