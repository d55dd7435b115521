"""Lab arms that are cached and resumable: an arm writes ``<dir>/arm.json`` once, atomically, with
the fingerprint of what it was asked; run again with the same request it loads that file instead of
sampling (a killed lab re-runs only its unfinished arms).

The best-of-n arm draws one pool of ``pool`` samples per prompt from the base policy, scores every
sample with the proxy and the gold, and reports the whole n = 1..pool curve with the one-pool
estimator of :mod:`tether.lab.bon` (its KL is the analytic best-of-n KL, an upper bound with ties).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tether.bon import sample_texts
from tether.lab.bon import bon_curve
from tether.models.generation import SamplingConfig
from tether.rewards import RewardFn, validate_rewards

ARM_FILE = "arm.json"
ARM_SCHEMA = 1
"""Version of the ``arm.json`` layout: {"schema", "kind", "fingerprint", "request", "points"}."""


def fingerprint(request: dict[str, Any]) -> str:
    """A stable hash of an arm's request (JSON with sorted keys)."""
    text = json.dumps(request, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_arm(arm_dir: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The finished arm in ``arm_dir`` if it answered this very request, else None."""
    path = arm_dir / ARM_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to re-run the arm") from e
    if saved.get("schema") != ARM_SCHEMA or saved.get("fingerprint") != fingerprint(request):
        return None
    return saved


def save_arm(
    arm_dir: Path, kind: str, request: dict[str, Any], points: list[dict[str, Any]]
) -> Path:
    """Write ``arm.json`` atomically (temp file in the same directory, then rename)."""
    arm_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "schema": ARM_SCHEMA,
        "kind": kind,
        "fingerprint": fingerprint(request),
        "request": request,
        "points": points,
    }
    fd, tmp = tempfile.mkstemp(dir=arm_dir, prefix=".arm-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    path = arm_dir / ARM_FILE
    os.replace(tmp, path)
    return path


@torch.no_grad()
def bon_arm(
    arm_dir: Path,
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    prompts: Sequence[str],
    proxy: RewardFn,
    gold: RewardFn,
    ns: Sequence[int],
    sampling: SamplingConfig,
    *,
    pool: int,
    seed: int,
    names: tuple[str, str] = ("proxy", "gold"),
    batch_size: int = 64,
) -> dict[str, Any]:
    """The best-of-n arm: one pool of ``pool`` samples per prompt (seeded), proxy and gold scores,
    :func:`tether.lab.bon.bon_curve` at each n in ``ns``; cached in ``arm_dir``.

    ``names`` (the proxy's and the gold's specs) and the model's name or path go into the
    fingerprint with the prompts, sampling, pool, seed and ns, so a changed request re-runs.
    Returns the arm record (``points``: one dict per n with n, kl_bound, proxy, gold, gold_se).
    """
    if max(ns) > pool:
        raise ValueError(f"n up to {max(ns)} needs a pool of at least that many, got {pool}")
    request = {
        "model": str(getattr(getattr(model, "config", None), "_name_or_path", "")),
        "prompts": list(prompts),
        "sampling": asdict(sampling),
        "pool": pool,
        "seed": seed,
        "ns": [int(n) for n in ns],
        "proxy": names[0],
        "gold": names[1],
    }
    done = load_arm(arm_dir, request)
    if done is not None:
        return done
    flat = [list(p) for p in prompt_ids for _ in range(pool)]
    texts = sample_texts(model, tokenizer, flat, sampling, seed, batch_size)
    flat_prompts = [p for p in prompts for _ in range(pool)]
    scores = []
    for fn, name in zip((proxy, gold), names, strict=True):
        v = validate_rewards(fn(flat_prompts, texts), len(texts), name, completions=texts)
        scores.append([list(v.values[i * pool : (i + 1) * pool]) for i in range(len(prompts))])
    points = [asdict(p) for p in bon_curve(scores[0], scores[1], ns)]
    save_arm(arm_dir, "bon", request, points)
    return json.loads((arm_dir / ARM_FILE).read_text(encoding="utf-8"))
