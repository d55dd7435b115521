"""Padding-free forwards: pack a padded batch's real tokens into fewer, fuller rows.

A right- (or left-) padded batch of 2B DPO rows spends FLOPs and activation memory on padding: with
lengths spread between ¼ and 1 × the longest, a third of the batch is padding. Packing places the
real tokens of several sequences one after another in a row whose length is the longest sequence's
(first-fit decreasing), gives each sequence position ids that restart at its own first position,
and lets transformers build the block-diagonal causal mask from those position ids
(``masking_utils.find_packed_sequence_indices``; flash-attention-2 turns them into variable-length
kernels, SDPA/eager into a block-diagonal mask), so no token attends across a sequence boundary.
The hidden states are scattered back to the padded (B, T, H) layout, so everything downstream is
unchanged and the result equals the padded forward up to floating-point summation order.

Whether a model honours packed position ids is not assumed: :func:`packing_supported` runs a
two-sequence packed forward against the padded one once per model and remembers the answer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

MIN_PADDING_FRACTION = 0.1  # auto mode packs only when at least this share of the batch is padding
_SUPPORTED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@dataclass
class PackPlan:
    """Where each real token of a padded (B, T) batch goes in the packed (R, C) batch."""

    src: Tensor
    """(N,) flat indices into B·T of the real tokens, in packing order."""
    dst: Tensor
    """(N,) flat indices into R·C where those tokens go."""
    position_ids: Tensor
    """(R, C) packed position ids: each sequence's own, padding restarting from 0."""
    rows: int
    """R: packed rows."""
    capacity: int
    """C: tokens per packed row (the longest sequence)."""


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) holding ``lengths`` with each bin's sum ≤ ``capacity``.

    First-fit decreasing: at most 11/9·OPT + 6/9 bins (Dósa 2007). Items longer than
    ``capacity`` are an error.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity}")
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def plan_packing(attention_mask: Tensor, position_ids: Tensor) -> PackPlan | None:
    """A packing of the real tokens of ``attention_mask`` (B, T), or None if it would not help.

    None when the batch has one row, when it has no padding worth removing (< 10 %), or when two
    sequences would sit back to back with contiguous position ids (the next one starting at the
    previous one's last position + 1), which the mask construction could not tell apart.
    """
    b, t = attention_mask.shape
    am = attention_mask.bool()
    lengths = am.sum(-1).tolist()
    real = sum(lengths)
    if b < 2 or real == 0 or 1.0 - real / (b * t) < MIN_PADDING_FRACTION:
        return None
    capacity = max(lengths)
    bins = first_fit_decreasing(lengths, capacity)
    if len(bins) == b:
        return None
    device = attention_mask.device
    flat_pos = position_ids.reshape(-1)
    srcs, dsts, pos_rows = [], [], []
    for r, members in enumerate(bins):
        offset = 0
        row_pos = []
        prev_last: int | None = None
        for i in members:
            idx = am[i].nonzero().squeeze(-1) + i * t  # (n_i,) flat indices of row i's tokens
            n = idx.numel()
            if n == 0:
                continue
            pos = flat_pos.index_select(0, idx)
            if prev_last is not None and int(pos[0]) == prev_last + 1:
                return None  # boundary would be invisible in the position ids
            prev_last = int(pos[-1])
            srcs.append(idx)
            dsts.append(torch.arange(offset, offset + n, device=device) + r * capacity)
            row_pos.append(pos)
            offset += n
        if offset < capacity:
            # trailing padding: a pseudo-sequence of its own, positions from 0
            row_pos.append(torch.arange(capacity - offset, device=device, dtype=flat_pos.dtype))
        pos_rows.append(torch.cat(row_pos))
    return PackPlan(
        src=torch.cat(srcs),
        dst=torch.cat(dsts),
        position_ids=torch.stack(pos_rows),
        rows=len(bins),
        capacity=capacity,
    )


def packed_hidden(
    backbone: nn.Module, input_ids: Tensor, plan: PackPlan, pad_id: int = 0
) -> Tensor:
    """Run ``backbone`` on the packed batch; (B, T, H) last hidden states, zero on padding."""
    b, t = input_ids.shape
    packed = torch.full(
        (plan.rows * plan.capacity,), pad_id, dtype=input_ids.dtype, device=input_ids.device
    )
    packed[plan.dst] = input_ids.reshape(-1).index_select(0, plan.src)
    hidden = backbone(
        input_ids=packed.view(plan.rows, plan.capacity),
        attention_mask=None,  # the packed position ids define the block-diagonal causal mask
        position_ids=plan.position_ids,
        use_cache=False,
    ).last_hidden_state  # (R, C, H)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, plan.dst)  # (N, H)
    out = flat.new_zeros(b * t, hidden.shape[-1]).index_copy(0, plan.src, flat)
    return out.view(b, t, -1)


@torch.no_grad()
def packing_supported(backbone: nn.Module) -> bool:
    """Whether ``backbone`` keeps packed sequences apart (checked once per module, then cached).

    Two sequences of 5 and 3 tokens are run padded and packed into one row; the hidden states
    of the real tokens must agree (rtol 1e-3 in the model's dtype).
    """
    known = _SUPPORTED.get(backbone)
    if known is not None:
        return known
    param = next(backbone.parameters())
    ids = torch.tensor(
        [[5, 6, 7, 8, 9], [10, 11, 12, 0, 0], [13, 14, 0, 0, 0]], device=param.device
    )
    am = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool, device=param.device
    )
    pos = (am.long().cumsum(-1) - 1).clamp(min=0)
    was = backbone.training
    backbone.eval()
    try:
        ref = backbone(
            input_ids=ids, attention_mask=am.long(), position_ids=pos, use_cache=False
        ).last_hidden_state
        plan = plan_packing(am, pos)
        ok = plan is not None
        if ok:
            got = packed_hidden(backbone, ids, plan)
            tol = 1e-3 if param.dtype == torch.float32 else 3e-2
            ok = bool(torch.allclose(got[am].float(), ref[am].float(), rtol=tol, atol=tol))
    except Exception:  # any failure means: do not pack this model
        ok = False
    finally:
        backbone.train(was)
    _SUPPORTED[backbone] = ok
    return ok
