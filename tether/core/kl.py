r"""KL divergence between a policy and its reference: sampled-token estimators and the exact KL.

Notation. ``logp`` = log π_θ(x_t | x_<t) and ``ref_logp`` = log π_ref(x_t | x_<t), both evaluated at
tokens x_t **sampled from π_θ**. With the ratio r = π_ref(x)/π_θ(x) (so log r = ref_logp − logp),
every estimator below estimates the *reverse* KL that RLHF penalises::

    KL(π_θ ‖ π_ref) = E_{x∼π_θ}[ log π_θ(x) − log π_ref(x) ].

The three estimators k1, k2, k3 are from J. Schulman, "Approximating KL Divergence" (2020,
http://joschu.net/blog/kl-approx.html). Their *values* are what you log or put in a shaped reward.
Their *gradients*, when the estimate is put in a loss and differentiated through ``logp`` (with the
sampled tokens held fixed, as every trainer does), are a different matter, worked out in Tang &
Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL" (arXiv:2506.09477) and
Zhang et al. 2025 (arXiv:2505.17508). For on-policy samples x ∼ π_θ, with s = ∇_θ log π_θ(x):

* **k1** = −log r. Unbiased; either sign per token; high variance. Gradient as a loss: s, with
  E[s] = 0, so k1 in the loss contributes no KL gradient at all.
* **k2** = ½ (log r)². Biased (agrees with the KL to second order); ≥ 0. Gradient as a loss:
  −log r · s, with expectation exactly ∇ KL(π_θ‖π_ref) (on-policy).
* **k3** = (r − 1) − log r. Unbiased; ≥ 0; low variance near the reference. Gradient as a loss:
  (1 − r)·s, with expectation ∇ KL(π_ref‖π_θ), the *forward* KL, not the one it estimates.
* **abs** = |log r|. Biased upward; ≥ 0. Gradient as a loss: sign(−log r)·s, the gradient of no KL.

So "k3 in the loss" (GRPO, arXiv:2402.03300 eq. 4) does not give an unbiased gradient of the KL it
reports. What does: (a) k1 as a *reward* with the score-function (policy-gradient) estimator, i.e.
``kl_in="reward"``; (b) k2 in the loss, on-policy; (c) :func:`loss_term`, which multiplies k1 or k3
by the importance ratio ρ = π_θ/π_behaviour and lets the gradient flow through ρ: its expected
gradient is ∇ KL(π_θ‖π_ref) on- *and* off-policy (PPO's later epochs), and for k3 the per-sample
gradient is exactly ρ·(−log r)·s, the policy-gradient estimator with k1 as reward. The test suite
checks each of these gradient claims by exact enumeration on a categorical policy.

:func:`exact_from_logits` computes the exact full-vocabulary KL per position from logits, chunk by
chunk, with a hand-written backward so that memory stays bounded in training too.

Shapes: ``B`` batch, ``T`` tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from tether.configs.literals import Estimator

ESTIMATORS: tuple[str, ...] = get_args(Estimator)
Direction = Literal["reverse", "forward"]

# Below this |log r| the k3 value is evaluated by its Taylor series to 5th order (truncation
# error < 3e-7 relative), which keeps k3 accurate and ≥ 0 where (r − 1) − log r cancels.
_K3_SERIES_BELOW = 0.1

# Default memory budget of the exact KL: elements of one fp32 (chunk, V) temporary (32 MiB).
_EXACT_CHUNK_ELEMENTS = 1 << 23


def _acc(x: Tensor) -> Tensor:
    """Upcast to float32 (float64 stays float64): estimators are always computed in ≥ fp32."""
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """log r = log π_ref(x) − log π_θ(x), in ≥ fp32, after checking the two inputs agree."""
    if not isinstance(logp, Tensor) or not isinstance(ref_logp, Tensor):
        raise TypeError("logp and ref_logp must be tensors of per-token log-probabilities")
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"logp shape {tuple(logp.shape)} and ref_logp shape {tuple(ref_logp.shape)} differ"
        )
    return _acc(ref_logp) - _acc(logp)


def k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = −log r = log π_θ(x) − log π_ref(x), x ∼ π_θ.

    Unbiased for KL(π_θ‖π_ref) but high variance and often negative per token (the KL is not).
    Variance: Var(log r); for q=N(0,1), p=N(μ,1) its std is 2/μ times the KL (Schulman 2020).
    As a loss term its gradient is s = ∇ log π_θ(x), whose expectation is 0: k1 in the loss does
    nothing in expectation. Use it as a reward (score-function gradient) or via :func:`loss_term`.

    Args:
        logp: log π_θ of the sampled tokens, any shape (e.g. (B, T)).
        ref_logp: log π_ref of the same tokens, same shape.

    Returns:
        Per-token estimate, same shape, float32 (float64 for float64 input).
    """
    return -_log_ratio(logp, ref_logp)


def k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½ (log r)², x ∼ π_θ.

    Always ≥ 0. Biased: its expectation is an f-divergence that agrees with the KL to second order
    when π_θ ≈ π_ref; for q=N(0,1), p=N(μ,1) the relative bias is μ²/4. Low variance near the
    reference. As a loss term (on-policy) its gradient is −log r · s, whose expectation is exactly
    ∇_θ KL(π_θ‖π_ref): k2 is the estimator whose *gradient* is right on-policy, though its value is
    biased. Off-policy (samples from an older policy) that no longer holds; use :func:`loss_term`.
    """
    return 0.5 * _log_ratio(logp, ref_logp).square()


def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (r − 1) − log r, x ∼ π_θ (Schulman 2020; GRPO's KL, arXiv:2402.03300 eq. 4).

    Unbiased for KL(π_θ‖π_ref) because E_π_θ[r] = 1, always ≥ 0 (log is concave), and lower
    variance than k1 when π_θ ≈ π_ref. Heavy right tail when π_ref(x) ≫ π_θ(x) (r is exponential
    in log r). As a loss term its gradient is (1 − r)·s, whose expectation is
    −Σ_x π_ref(x) ∇ log π_θ(x) = ∇_θ KL(π_ref‖π_θ): the gradient of the *forward* KL, not of the
    reverse KL that the value estimates. :func:`loss_term` with ``estimator="k3"`` fixes this.
    """
    log_r = _log_ratio(logp, ref_logp)
    series = log_r.square() * (0.5 + log_r * (1.0 / 6.0 + log_r * (1.0 / 24.0 + log_r / 120.0)))
    direct = torch.expm1(log_r) - log_r
    return torch.where(log_r.abs() < _K3_SERIES_BELOW, series, direct)


def absolute(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """abs = |log r|, x ∼ π_θ (the "abs" penalty of early PPO-for-LM code).

    ≥ 0 and biased upward: E|log r| ≥ |E log r| = KL. As a loss term its gradient is
    sign(−log r)·s, which is the gradient of no KL; use it for monitoring or as a reward only.
    """
    return _log_ratio(logp, ref_logp).abs()


_ESTIMATOR_FNS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": k1,
    "k2": k2,
    "k3": k3,
    "abs": absolute,
}


def estimate(logp: Tensor, ref_logp: Tensor, estimator: Estimator = "k1") -> Tensor:
    """Per-token KL(π_θ‖π_ref) estimate with the named estimator ("k1", "k2", "k3" or "abs").

    Args:
        logp: log π_θ of tokens sampled from π_θ, any shape.
        ref_logp: log π_ref of the same tokens, same shape.
        estimator: which estimator; see the module table for bias, sign and gradient.

    Returns:
        Per-token estimates, same shape, float32 (float64 for float64 input). Aggregate them with
        :func:`tether.core.masked.aggregate` and a mask.
    """
    try:
        fn = _ESTIMATOR_FNS[estimator]
    except KeyError:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}") from None
    return fn(logp, ref_logp)


def loss_term(
    logp: Tensor,
    ref_logp: Tensor,
    estimator: Literal["k1", "k3"] = "k3",
    behaviour_logp: Tensor | None = None,
) -> Tensor:
    """Per-token KL penalty for a loss, whose expected gradient is ∇_θ KL(π_θ‖π_ref).

    Returns ρ·k(logp, ref_logp) with ρ = exp(logp − behaviour_logp), differentiated through both
    ρ and k. ``behaviour_logp`` is the log-prob under the policy that sampled the tokens (π_old in
    PPO's later epochs); when omitted it is ``logp.detach()``, so ρ = 1 in value while still
    carrying ∇ log π_θ. For x ∼ π_behaviour (Zhang et al. 2025, arXiv:2505.17508 §3):

    * k3: ∇(ρ k3) = ρ·(−log r)·s, so E[∇] = E_π_θ[k1 · s] = ∇ KL(π_θ‖π_ref), and the value ρ·k3 is
      an unbiased, non-negative estimate of the KL;
    * k1: ∇(ρ k1) = ρ·(k1 + 1)·s, also unbiased in expectation (the extra ρ·s has mean 0) but
      noisier per sample than k3.

    k2 and abs are refused: with the ρ factor neither has the KL's gradient (on-policy, k2 alone
    does: see :func:`k2`).

    Args:
        logp: log π_θ of the sampled tokens (requires grad), any shape.
        ref_logp: log π_ref of the same tokens (no grad needed).
        estimator: ``"k3"`` (default) or ``"k1"``.
        behaviour_logp: log-prob under the sampling policy, same shape, or ``None`` (on-policy).

    Returns:
        Per-token penalty, same shape, float32 (float64 for float64 input).
    """
    if estimator not in ("k1", "k3"):
        raise ValueError(
            f"loss_term estimator must be 'k1' or 'k3' (k2/abs have no KL gradient with an "
            f"importance weight), got {estimator!r}"
        )
    if behaviour_logp is None:
        behaviour_logp = logp.detach()
    elif behaviour_logp.shape != logp.shape:
        raise ValueError(
            f"behaviour_logp shape {tuple(behaviour_logp.shape)} does not match logp shape "
            f"{tuple(logp.shape)}"
        )
    rho = torch.exp(_acc(logp) - _acc(behaviour_logp).detach())
    return rho * estimate(logp, ref_logp, estimator)


def anchored_ref_logp(ref_logp: Tensor, kl_logp: Tensor, behaviour_logp: Tensor) -> Tensor:
    """The reference log-prob carried into the training forward's numerics, for a KL in a loss.

    A KL term in the loss needs log r = log π_ref − log π_θ with log π_θ from the training forward
    (it carries the gradient), which under bf16 autocast has rounding noise that does not cancel
    against a reference computed elsewhere (see :mod:`tether.models.numerics`). Split the
    log-ratio at the behaviour policy π_old::

        log π_ref − log π_θ = [log π_ref − log π_old]_kl + [log π_old − log π_θ]_train

    The first bracket is measured in the KL's numerics (fp32: ``ref_logp`` and ``kl_logp``, both
    π_old's and π_ref's log-probs of the same tokens), the second in the training numerics, where
    it is the PPO log-ratio and exactly 0 on the first, on-policy forward. This returns
    ``behaviour_logp + ref_logp − kl_logp``, so that passing it as the reference to
    :func:`loss_term` gives that split log-ratio, with the gradient through ``logp`` unchanged.
    When ``kl_logp`` is the behaviour log-prob itself (``kl_precision="train"``) it is
    ``ref_logp``.

    Args:
        ref_logp: (B, T) log π_ref of the sampled tokens, KL numerics.
        kl_logp: (B, T) log π_old of the same tokens, KL numerics.
        behaviour_logp: (B, T) log π_old of the same tokens, training numerics.

    Returns:
        (B, T) float32 (float64 for float64 input), detached.
    """
    if not ref_logp.shape == kl_logp.shape == behaviour_logp.shape:
        raise ValueError(
            f"ref_logp {tuple(ref_logp.shape)}, kl_logp {tuple(kl_logp.shape)} and "
            f"behaviour_logp {tuple(behaviour_logp.shape)} must have the same shape"
        )
    return (_acc(behaviour_logp) + (_acc(ref_logp) - _acc(kl_logp))).detach()


# --------------------------------------------------------------------------------------------
# Exact KL over the full vocabulary
# --------------------------------------------------------------------------------------------


def _kl_rows(lp: Tensor, lq: Tensor) -> Tensor:
    """Σ_v p_v (log p_v − log q_v) per row of (N, V) log-probs; 0·log 0 taken as 0.

    Consumes ``lp`` (overwritten in place): the chunked forward has no autograd graph, and reusing
    the buffer keeps the temporaries to three (C, V) tensors.
    """
    p = lp.exp()
    terms = lp.sub_(lq).mul_(p).masked_fill_(p == 0, 0.0)
    return terms.sum(dim=-1)


class _ChunkedExactKL(torch.autograd.Function):
    """KL between row-wise softmaxes of two (N, V) logit matrices, chunked over rows.

    Forward and backward both visit ``chunk`` rows at a time, recomputing the log-softmaxes in
    backward instead of saving them, so the extra memory is O(chunk·V) rather than O(N·V).
    Gradients (z = logits of the first argument of the KL, w = of the second; P = softmax(z),
    Q = softmax(w), KL = KL(P‖Q)):  ∂KL/∂z_j = P_j (log P_j − log Q_j − KL),  ∂KL/∂w_j = Q_j − P_j.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        logits: Tensor,
        ref_logits: Tensor,
        rows: Tensor | None,
        reverse: bool,
        chunk: int,
    ) -> Tensor:
        n = logits.shape[0]
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        out = torch.empty(n, dtype=acc, device=logits.device)
        for s in range(0, n, chunk):
            lp = F.log_softmax(logits[s : s + chunk].to(acc), dim=-1)  # (C, V)
            lq = F.log_softmax(ref_logits[s : s + chunk].to(acc), dim=-1)  # (C, V)
            out[s : s + chunk] = _kl_rows(lp, lq) if reverse else _kl_rows(lq, lp)
        ctx.save_for_backward(logits, ref_logits, rows, out)
        ctx.reverse = reverse
        ctx.chunk = chunk
        if rows is not None:
            return torch.where(rows, out, 0.0)
        return out.clone()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        logits, ref_logits, rows, out = ctx.saved_tensors
        need_z, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_z = torch.empty_like(logits) if need_z else None
        g_w = torch.empty_like(ref_logits) if need_w else None
        # With z the first argument of the KL (reverse), ∂/∂z is the "first" formula below.
        g_first, g_second = (g_z, g_w) if ctx.reverse else (g_w, g_z)
        src_first, src_second = (logits, ref_logits) if ctx.reverse else (ref_logits, logits)
        acc = out.dtype
        g_all = grad_out.to(acc)
        if rows is not None:
            g_all = torch.where(rows, g_all, 0.0)
        for s in range(0, logits.shape[0], ctx.chunk):
            e = s + ctx.chunk
            g = g_all[s:e, None]  # (C, 1)
            drop = None if rows is None else ~rows[s:e, None]  # (C, 1)
            lf = F.log_softmax(src_first[s:e].to(acc), dim=-1)  # (C, V) log P
            ls = F.log_softmax(src_second[s:e].to(acc), dim=-1)  # (C, V) log Q
            pf = lf.exp()  # (C, V)
            if g_second is not None:  # Q − P, times the upstream gradient
                d = ls.exp().sub_(pf).mul_(g)
                if drop is not None:
                    d.masked_fill_(drop, 0.0)
                g_second[s:e] = d
                del d
            if g_first is not None:  # P (log P − log Q − KL), times the upstream gradient
                d = lf.sub_(ls).sub_(out[s:e, None]).mul_(pf).masked_fill_(pf == 0, 0.0).mul_(g)
                if drop is not None:
                    d.masked_fill_(drop, 0.0)
                g_first[s:e] = d
        return g_z, g_w, None, None, None


def exact_from_logits(
    logits: Tensor,
    ref_logits: Tensor,
    mask: Tensor | None = None,
    direction: Direction = "reverse",
    chunk_size: int | None = None,
) -> Tensor:
    """Exact KL between the two next-token distributions at every position, over the full vocab.

    ``direction="reverse"``: KL(π_θ‖π_ref) = Σ_v π_θ(v) (log π_θ(v) − log π_ref(v)), the KL that
    RLHF penalises. ``direction="forward"``:
    KL(π_ref‖π_θ) = Σ_v π_ref(v) (log π_ref(v) − log π_θ(v)).
    Computed in fp32 (float64 for float64 input) ``chunk_size`` positions at a time, forward and
    backward (a custom autograd function recomputes each chunk's log-softmax in backward), so
    the extra memory is O(chunk_size·V), never O(B·T·V), beyond the gradient buffer itself.
    Differentiable w.r.t. ``logits`` and, if it requires grad, ``ref_logits``.

    Args:
        logits: policy logits (..., V), e.g. (B, T, V); any float dtype (bf16 is fine).
        ref_logits: reference logits, same shape.
        mask: optional BoolTensor of shape ``logits.shape[:-1]``; positions that are False get
            KL 0 and zero gradient (whatever their logits hold, NaN included).
        direction: ``"reverse"`` or ``"forward"``.
        chunk_size: positions per chunk; default keeps one fp32 (chunk, V) temporary ≤ 32 MiB.

    Returns:
        Per-position KL of shape ``logits.shape[:-1]``, e.g. (B, T), float32 (float64 for
        float64 input). Aggregate with :func:`tether.core.masked.aggregate`.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(
            f"logits shape {tuple(logits.shape)} and ref_logits shape "
            f"{tuple(ref_logits.shape)} differ"
        )
    if logits.dim() < 1 or not logits.is_floating_point() or not ref_logits.is_floating_point():
        raise ValueError("logits and ref_logits must be floating-point tensors of shape (..., V)")
    if direction not in ("reverse", "forward"):
        raise ValueError(f"direction must be 'reverse' or 'forward', got {direction!r}")
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    if chunk_size is None:
        chunk_size = max(1, _EXACT_CHUNK_ELEMENTS // max(vocab, 1))
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    rows = None
    if mask is not None:
        if mask.dtype != torch.bool or mask.shape != lead:
            raise ValueError(
                f"mask must be a BoolTensor of shape {tuple(lead)} (logits without V), got "
                f"{mask.dtype} {tuple(mask.shape)}"
            )
        rows = mask.reshape(-1)
    out = _ChunkedExactKL.apply(
        logits.reshape(-1, vocab),
        ref_logits.reshape(-1, vocab),
        rows,
        direction == "reverse",
        chunk_size,
    )
    return out.reshape(lead)


def best_of_n_kl(n: int) -> float:
    """Analytic KL(π_BoN ‖ π) of best-of-n sampling: log n − (n − 1)/n.

    Exact for a continuous reward distribution without ties (Stiennon et al. 2020, App. G.3;
    Gao et al. 2022, arXiv:2210.10760 §2); an upper bound when ties have positive probability
    (Beirami et al. 2024, arXiv:2401.01879). 0 for n = 1; grows like log n.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"best_of_n_kl: n must be an integer ≥ 1, got {n!r}")
    return math.log(n) - (n - 1) / n
