"""Masked reductions and the aggregation modes every loss and metric uses.

One convention throughout tether: ``mask`` is a ``torch.BoolTensor`` of the same shape as the
values, ``True`` where a position counts. Nothing is ever written into padded positions to make
a reduction come out right; the mask is passed explicitly and the reduction honours it.

Statistics are accumulated in float32 (float64 inputs stay float64), whatever the input dtype,
so bf16 activations do not lose the sums.

Empty masks are defined, never NaN:

* ``masked_sum`` over nothing is 0;
* ``masked_mean`` over nothing is 0 (a batch of empty responses contributes no loss and no
  gradient, rather than poisoning the step with NaN);
* ``masked_var`` over fewer than ``1 + unbiased`` elements is 0;
* ``masked_whiten`` of fewer than two elements returns the centred values (zeros).

Shapes: ``B`` batch, ``T`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import torch
from torch import Tensor

from tether.configs.literals import Aggregation

AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


def _acc_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is accumulated in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_mask(x: Tensor, mask: Tensor) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a torch.BoolTensor (True = position counts), got {got}")
    if mask.shape != x.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match values shape {tuple(x.shape)}"
        )


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is True.

    Args:
        x: values, any shape.
        mask: BoolTensor, same shape as ``x``.
        dim: dimension(s) to reduce; ``None`` reduces everything to a scalar.

    Returns:
        The sum in float32 (float64 for float64 input); 0 where nothing is selected.
        Masked-out entries are excluded with ``torch.where``, so NaN/inf in padding never leak.
    """
    _check_mask(x, mask)
    xs = torch.where(mask, x.to(_acc_dtype(x)), 0.0)
    return xs.sum() if dim is None else xs.sum(dim=dim)


def masked_count(mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Number of True positions (as the accumulation dtype float32)."""
    m = mask.to(torch.float32)
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is True; 0 where nothing is selected.

    Args:
        x: values, any shape.
        mask: BoolTensor, same shape as ``x``.
        dim: dimension(s) to reduce; ``None`` reduces everything to a scalar.
    """
    total = masked_sum(x, mask, dim)
    count = masked_count(mask, dim).to(total.dtype)
    return total / count.clamp(min=1.0)


def masked_var(
    x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None, unbiased: bool = True
) -> Tensor:
    """Variance of ``x`` over the masked positions.

    Two-pass (mean first, then squared deviations) for numerical stability. With
    ``unbiased=True`` the Bessel correction n/(n−1) is applied; the variance of fewer than
    ``1 + unbiased`` elements is defined as 0.
    """
    mean = masked_mean(x, mask, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim) if isinstance(dim, int) else _unsqueeze_all(mean, dim)
    dev2 = (x.to(mean.dtype) - mean) ** 2
    ss = masked_sum(dev2, mask, dim)
    n = masked_count(mask, dim).to(ss.dtype)
    denom = n - 1.0 if unbiased else n
    return torch.where(denom > 0, ss / denom.clamp(min=1.0), torch.zeros_like(ss))


def _unsqueeze_all(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    ndim = t.dim() + len(dims)
    for d in sorted(d % ndim for d in dims):
        t = t.unsqueeze(d)
    return t


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance over all masked positions.

    ``(x − mean) / sqrt(var + eps)`` with mean and (unbiased) variance taken over the positions
    where ``mask`` is True; with ``shift_mean=False`` the mean is added back (scale only), as
    for rewards whose sign carries meaning. Masked-out positions of the output are 0.

    Args:
        x: values, e.g. advantages (B, T).
        mask: BoolTensor, same shape.
        shift_mean: subtract the mean (True) or only rescale (False).
        eps: added to the variance before the square root.
        reduce: a sum over processes (e.g. :meth:`tether.train.distributed.Dist.sum`): the mean
            and variance are then those of the masked positions of *every* process's ``x``
            (two passes: Σx and n, then Σ(x − mean)²), as on one process with the whole batch.

    Returns:
        A tensor of ``x``'s shape in the accumulation dtype (float32, or float64 for float64).
    """
    if reduce is None:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=True)
    else:
        xf = x.to(_acc_dtype(x))
        first = reduce(torch.stack([masked_sum(xf, mask), masked_count(mask).to(xf.dtype)]))
        n = first[1]
        mean = first[0] / n.clamp(min=1.0)
        ss = reduce(masked_sum((xf - mean) ** 2, mask))
        var = torch.where(n > 1, ss / (n - 1.0).clamp(min=1.0), torch.zeros_like(ss))
    xf = x.to(mean.dtype)
    out = (xf - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0.0)


def aggregate(
    x: Tensor,
    mask: Tensor,
    mode: Aggregation = "token_mean",
    denominator: float | Tensor | None = None,
) -> Tensor:
    """Reduce per-token values (B, T) to one scalar, in one of three well-defined ways.

    * ``"token_mean"``: Σ_{b,t} m·x / Σ_{b,t} m, the global token mean: every token weighs the
      same, so long responses weigh more (DAPO, arXiv:2503.14476 §3.3).
    * ``"seq_mean"``: mean over sequences of the per-sequence token mean
      (1/B' Σ_b (Σ_t m·x / Σ_t m)), the original PPO-for-LMs / GRPO (arXiv:2402.03300 eq. 3)
      normalisation; sequences with no counted token are left out of B'.
    * ``"seq_sum"``: mean over sequences of the per-sequence token sum (1/B' Σ_b Σ_t m·x): the
      sequence-level quantity, e.g. a per-sequence KL or log-prob. Without seq_mean's 1/|o_b|
      per-sequence length normalisation, as Dr. GRPO removes it (Liu et al. 2025,
      arXiv:2503.20783; its code divides the token sum by a constant budget instead, a constant
      factor away). B' counts the sequences with at least one counted token, as ``seq_mean``
      does: an empty (e.g. skipped) sequence is left out, not counted as a 0.

    Args:
        x: per-token values (B, T).
        mask: BoolTensor (B, T), True = token counts.
        mode: one of ``"token_mean" | "seq_mean" | "seq_sum"``.
        denominator: if given, replaces the count that normalises the total (tokens for
            ``token_mean``, non-empty sequences for the other two). Use it to normalise by a
            global count across micro-batches or processes so that accumulated gradients equal
            the full-batch gradient.

    Returns:
        Scalar tensor (float32, or float64 for float64 input). 0 for an empty mask.
    """
    if x.dim() != 2:
        raise ValueError(
            f"aggregate expects per-token values of shape (B, T), got {tuple(x.shape)}"
        )
    _check_mask(x, mask)
    if mode == "token_mean":
        total = masked_sum(x, mask)
        count = masked_count(mask)
    elif mode == "seq_mean":
        per_seq = masked_mean(x, mask, dim=-1)  # (B,)
        nonempty = mask.any(dim=-1)  # (B,)
        total = torch.where(nonempty, per_seq, 0.0).sum()
        count = nonempty.to(torch.float32).sum()
    elif mode == "seq_sum":
        total = masked_sum(x, mask, dim=-1).sum()
        count = mask.any(dim=-1).to(torch.float32).sum()  # non-empty sequences, as seq_mean
    else:
        raise ValueError(f"aggregation mode must be one of {AGGREGATIONS}, got {mode!r}")
    if denominator is not None:
        count = torch.as_tensor(denominator, dtype=total.dtype, device=total.device)
        if (count <= 0).any():
            raise ValueError(f"denominator must be positive, got {denominator}")
        return total / count
    return total / count.to(total.dtype).to(total.device).clamp(min=1.0)
