"""Padding and collation. Masks are explicit BoolTensors (True = real token); pad ids never
double as masks.

Shapes: ``B`` batch (examples), ``T`` tokens; prompts alone are ``P`` tokens long.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from tether.data.examples import PreferenceExample, PromptExample


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


def collate_prompts(examples: Sequence[PromptExample], pad_id: int) -> dict[str, Tensor]:
    """Batch prompts for generation, LEFT-padded so every prompt ends at the last column.

    Args:
        examples: B prompts (e.g. a ``PromptDataset`` batch from a ``DataLoader``).
        pad_id: id written into padding.

    Returns:
        ``input_ids`` LongTensor (B, P); ``attention_mask`` BoolTensor (B, P), True on prompt
        tokens; ``index`` LongTensor (B,), each example's row in its source.
    """
    _check_batch(examples)
    input_ids, attention_mask = pad_sequences(
        [ex.prompt_ids for ex in examples], pad_id, side="left"
    )  # (B, P)
    index = torch.tensor([ex.index for ex in examples], dtype=torch.long)  # (B,)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "index": index}


def collate_preferences(examples: Sequence[PreferenceExample], pad_id: int) -> dict[str, Tensor]:
    """Batch preference pairs as one concatenated batch of 2B sequences, RIGHT-padded.

    Rows ``0..B-1`` are prompt + chosen, rows ``B..2B-1`` prompt + rejected, in the same example
    order, so one forward pass scores both and ``logps[:B]`` / ``logps[B:]`` split them.

    Args:
        examples: B preference pairs.
        pad_id: id written into padding.

    Returns:
        ``input_ids`` LongTensor (2B, T); ``attention_mask`` BoolTensor (2B, T), True on prompt and
        response tokens; ``response_mask`` BoolTensor (2B, T), True exactly on response tokens,
        aligned with ``input_ids`` (shift it by one, ``response_mask[:, 1:]``, to align with the
        log-probs of next tokens ``logits[:, :-1]``); ``prompt_lengths`` LongTensor (2B,);
        ``index`` LongTensor (B,), each pair's row in its source.
    """
    _check_batch(examples)
    prompts = [ex.prompt_ids for ex in examples] * 2
    responses = [ex.chosen_ids for ex in examples] + [ex.rejected_ids for ex in examples]
    input_ids, attention_mask = pad_sequences(
        [[*p, *r] for p, r in zip(prompts, responses, strict=True)], pad_id, side="right"
    )  # (2B, T)
    response_mask = torch.zeros_like(attention_mask)  # (2B, T)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        response_mask[i, len(p) : len(p) + len(r)] = True
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)  # (2B,)
    index = torch.tensor([ex.index for ex in examples], dtype=torch.long)  # (B,)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
        "prompt_lengths": prompt_lengths,
        "index": index,
    }


def _check_batch(examples: Sequence[object]) -> None:
    if len(examples) == 0:
        raise ValueError("cannot collate an empty batch")
