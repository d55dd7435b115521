"""Lab arms that are cached and resumable: an arm writes ``<dir>/arm.json`` once, atomically, with
the fingerprint of what it was asked; run again with the same request it loads that file instead of
sampling (a killed lab re-runs only its unfinished arms).

The best-of-n arm scores one pool of samples per prompt from the base policy
(:func:`tether.lab.pool.sample_pool`, which holds their gold rewards) with a proxy and reports the
whole n = 1..N curve with the one-pool estimator of :mod:`tether.lab.bon`, with the analytic KL
bound and tether's Monte-Carlo KL estimate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.lab.bon import bon_curve, bon_kl_mc
from tether.lab.cache import load_cached, save_cached
from tether.rewards import RewardFn, call_reward

if TYPE_CHECKING:
    from tether.lab.pool import Pool

ARM_FILE = "arm.json"


def load_arm(arm_dir: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The finished arm in ``arm_dir`` if it answered this very request, else None."""
    return load_cached(arm_dir / ARM_FILE, request)


def save_arm(
    arm_dir: Path, kind: str, request: dict[str, Any], points: list[dict[str, Any]], **extra: Any
) -> Path:
    """Write ``arm_dir/arm.json`` atomically with the arm's points (and any extra fields)."""
    save_cached(arm_dir / ARM_FILE, kind, request, points=points, **extra)
    return arm_dir / ARM_FILE


def bon_arm(
    arm_dir: Path,
    pool: Pool,
    proxy: RewardFn,
    ns: Sequence[int],
    *,
    proxy_name: str,
    pool_fingerprint: str,
    seed: int = 0,
) -> dict[str, Any]:
    """The best-of-n arm: the pool scored by ``proxy``, :func:`tether.lab.bon.bon_curve` at each
    n in ``ns`` with the analytic KL bound and the Monte-Carlo KL estimate; cached in ``arm_dir``.

    Returns the arm record (``points``: one dict per n with n, kl_bound, kl_mc, kl_mc_se, proxy,
    gold, gold_se).
    """
    if max(ns) > pool.k:
        raise ValueError(f"n up to {max(ns)} needs a pool of at least that many, got {pool.k}")
    request = {"pool": pool_fingerprint, "ns": [int(n) for n in ns], "proxy": proxy_name}
    done = load_arm(arm_dir, request)
    if done is not None:
        return done
    flat_prompts, texts = pool.flat()
    v = call_reward(proxy, flat_prompts, texts, proxy_name, stage="the lab's best-of-n arm")
    k = pool.k
    scores = [list(v.values[i * k : (i + 1) * k]) for i in range(len(pool.prompts))]
    points = []
    for point in bon_curve(scores, pool.gold, ns):
        kl_mc, kl_mc_se = bon_kl_mc(scores, point.n, seed=seed)
        points.append({**asdict(point), "kl_mc": kl_mc, "kl_mc_se": kl_mc_se})
    save_arm(arm_dir, "bon", request, points)
    return json.loads((arm_dir / ARM_FILE).read_text(encoding="utf-8"))
