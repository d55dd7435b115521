"""Best-of-n curves from one pool of samples: the unbiased estimator of Gao et al. 2022.

Drawing N ≥ n samples per prompt once and picking the best of a *random n-subset* by the proxy
gives, in expectation over subsets, the best-of-n result. Averaging over *all* C(N, n) subsets in
closed form (Gao, Schulman & Hilton 2022, arXiv:2210.10760, App. I; Nakano et al. 2021): with the
samples sorted by proxy reward ascending, the sample of rank i (1-based) is the best of a uniformly
random n-subset with probability

    w_i(n) = C(i − 1, n − 1) / C(N, n),

so E[r(best of n)] = Σ_i w_i(n)·r_(i) for the proxy itself and for any other reward measured on the
same samples (the gold): one pool gives the whole n = 1, 2, 4, … curve without re-sampling, with
less variance than one subset per n. Ties in the proxy are broken by sample order (the first
sample wins a tie, as :func:`tether.bon.best_of_n` does). The KL of best-of-n to the sampling
policy is at most log n − (n − 1)/n (:func:`tether.core.kl.best_of_n_kl`; equal without ties).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tether.core.kl import best_of_n_kl


@dataclass(frozen=True)
class BoNPoint:
    """Best-of-n at one n, averaged over prompts.

    Attributes:
        n: candidates per prompt.
        kl_bound: log n − (n − 1)/n (nats).
        proxy: E[proxy reward of the pick].
        gold: E[gold reward of the pick].
        gold_se: standard error of ``gold`` over prompts (nan with one prompt).
    """

    n: int
    kl_bound: float
    proxy: float
    gold: float
    gold_se: float


def pick_weights(pool: int, n: int) -> np.ndarray:
    """(N,) w_i(n) = C(i − 1, n − 1)/C(N, n) for ranks i = 1..N (ascending): the probability that
    the i-th smallest of N is the largest of a uniformly random n-subset. Sums to 1; computed in
    log space (lgamma), so N in the thousands is fine."""
    if not 1 <= n <= pool:
        raise ValueError(f"n must be in 1..{pool} (the pool size), got {n}")
    i = np.arange(1, pool + 1)
    out = np.zeros(pool)
    ok = i >= n
    lg = np.vectorize(math.lgamma)
    log_c = lg(i[ok]) - lg(n) - lg(i[ok] - n + 1)  # log C(i − 1, n − 1)
    log_total = math.lgamma(pool + 1) - math.lgamma(n + 1) - math.lgamma(pool - n + 1)
    out[ok] = np.exp(log_c - log_total)
    return out


def bon_curve(
    proxy: Sequence[Sequence[float]], gold: Sequence[Sequence[float]], ns: Sequence[int]
) -> list[BoNPoint]:
    """Best-of-n by ``proxy`` for every n in ``ns``, from one pool of N samples per prompt.

    Args:
        proxy: (P, N) proxy rewards of the pool (P prompts × N samples, in sampling order).
        gold: (P, N) gold rewards of the same samples.
        ns: the n's, each in 1..N.

    Returns:
        One :class:`BoNPoint` per n, in the order given.
    """
    p = np.asarray(proxy, dtype=np.float64)
    g = np.asarray(gold, dtype=np.float64)
    if p.ndim != 2 or p.shape != g.shape:
        raise ValueError(f"proxy and gold must both be (P, N), got {p.shape} and {g.shape}")
    if not (np.isfinite(p).all() and np.isfinite(g).all()):
        raise ValueError("proxy and gold rewards must be finite")
    prompts, pool = p.shape
    # ascending by proxy; among equal proxies the *first* sample must rank highest (it wins a
    # tie), so sort by (proxy, −index)
    order = np.lexsort((-np.arange(pool)[None, :].repeat(prompts, 0), p), axis=1)
    ps = np.take_along_axis(p, order, 1)  # (P, N)
    gs = np.take_along_axis(g, order, 1)
    points = []
    for n in ns:
        w = pick_weights(pool, int(n))  # (N,)
        per_prompt_gold = gs @ w  # (P,)
        se = float(per_prompt_gold.std(ddof=1) / math.sqrt(prompts)) if prompts > 1 else math.nan
        points.append(
            BoNPoint(
                n=int(n),
                kl_bound=best_of_n_kl(int(n)),
                proxy=float((ps @ w).mean()),
                gold=float(per_prompt_gold.mean()),
                gold_se=se,
            )
        )
    return points


def bon_kl_mc(
    proxy: Sequence[Sequence[float]], n: int, *, repeats: int = 8, seed: int = 0
) -> tuple[float, float]:
    """tether's Monte-Carlo estimate of KL(π_BoN‖π) at n from the same pool (mean, stderr).

    Per prompt and repeat, a seeded random n-subset of the pool is the candidates and the other
    N − n samples are the independent calibration draws of :func:`tether.bon.bon_kl_estimate`
    (which is pure: rewards in, estimate out). (nan, nan) when N − n < 1.
    """
    from tether.bon import bon_kl_estimate

    p = np.asarray(proxy, dtype=np.float64)
    prompts, pool = p.shape
    if pool - n < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    picks, calib = [], []
    for i in range(prompts):
        for _ in range(repeats):
            perm = rng.permutation(pool)
            cand, rest = perm[:n], perm[n:]
            picks.append(float(p[i, cand].max()))
            calib.append(p[i, rest].tolist())
    est = bon_kl_estimate(picks, calib, n)
    # repeats of one prompt are not independent: the standard error is over prompts
    per_prompt = np.asarray(est.per_prompt).reshape(prompts, repeats).mean(1)
    se = float(per_prompt.std(ddof=1) / math.sqrt(prompts)) if prompts > 1 else math.nan
    return est.mean, se
