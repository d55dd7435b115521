"""Samples of the base policy, scored by the gold, cached: the lab's raw material.

A *pool* is k completions per prompt drawn from π_init (seeded) with their gold rewards. The lab
draws two: one on the proxy prompts, turned into gold-labelled preference pairs to train the proxy
reward models on (Gao et al. 2022 §2: proxies trained on gold labels of π_init's samples), and
one on the held-out eval prompts, which best-of-n picks from.

:func:`gold_pairs` makes pairs from each prompt's completions, labelled by the gold (the higher
gold is "chosen"); near-ties (|Δgold| < ``min_gap``) carry no label and are dropped. The pairs are
ordered round-robin over prompts in a seeded order, so the first N of them spread over as many
prompts as possible and every smaller N of a ladder is a subset of every larger one.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tether.bon import sample_texts
from tether.lab.cache import load_cached, save_cached
from tether.models.generation import SamplingConfig
from tether.rewards import RewardFn, call_reward
from tether.runs import Progress


@dataclass(frozen=True)
class Pool:
    """k completions per prompt with their gold rewards.

    Attributes:
        prompts: (P,) the rendered prompt texts.
        completions: (P, k) completions, decoded without special tokens.
        gold: (P, k) the gold reward of each completion.
    """

    prompts: list[str]
    completions: list[list[str]]
    gold: list[list[float]]

    @property
    def k(self) -> int:
        return len(self.completions[0]) if self.completions else 0

    def flat(self) -> tuple[list[str], list[str]]:
        """(P·k,) prompts and completions, prompt-major."""
        prompts = [p for p, row in zip(self.prompts, self.completions, strict=True) for _ in row]
        return prompts, [c for row in self.completions for c in row]


def sample_pool(
    path: Path,
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    k: int,
    sampling: SamplingConfig,
    gold: RewardFn,
    *,
    seed: int,
    gold_name: str,
    model_name: str,
    batch_size: int = 64,
) -> Pool:
    """Draw (or load, when ``path`` holds this very request) ``k`` completions per prompt and
    their gold rewards; the file is written once, atomically."""
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    request = {
        "model": model_name,
        "prompts": list(prompts),
        "k": k,
        "sampling": asdict(sampling),
        "seed": seed,
        "gold": gold_name,
    }
    saved = load_cached(path, request)
    if saved is None:
        flat_ids = [list(p) for p in prompt_ids for _ in range(k)]
        texts: list[str] = []
        with Progress(len(flat_ids), metrics=(), description=f"sample {path.stem}") as bar:
            for s in range(0, len(flat_ids), batch_size):  # torch's RNG seeded at the first
                chunk = flat_ids[s : s + batch_size]
                texts += sample_texts(
                    model, tokenizer, chunk, sampling, seed if s == 0 else None, batch_size
                )
                bar.update(len(texts), {"samples": len(texts)})  # a plain line per batch
        flat_prompts = [p for p in prompts for _ in range(k)]
        values = call_reward(gold, flat_prompts, texts, gold_name, stage="the lab's gold scoring")
        rows = [texts[i * k : (i + 1) * k] for i in range(len(prompts))]
        golds = [list(values.values[i * k : (i + 1) * k]) for i in range(len(prompts))]
        saved = save_cached(path, "pool", request, completions=rows, gold=golds)
    return Pool(list(prompts), saved["completions"], saved["gold"])


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    gap: float
    """gold(chosen) − gold(rejected) > 0."""


def gold_pairs(pool: Pool, limit: int, seed: int, min_gap: float = 1e-6) -> list[Pair]:
    """Up to ``limit`` gold-labelled pairs from each prompt's completions (see the module
    docstring): all C(k, 2) pairs per prompt with |Δgold| ≥ ``min_gap`` and distinct texts,
    shuffled per prompt, then taken round-robin over the prompts in a seeded order."""
    rng = random.Random(seed)
    per_prompt: list[list[Pair]] = []
    for prompt, texts, golds in zip(pool.prompts, pool.completions, pool.gold, strict=True):
        pairs = []
        for i, j in itertools.combinations(range(len(texts)), 2):
            if texts[i] == texts[j] or abs(golds[i] - golds[j]) < min_gap:
                continue
            w, lo = (i, j) if golds[i] > golds[j] else (j, i)
            pairs.append(Pair(prompt, texts[w], texts[lo], golds[w] - golds[lo]))
        rng.shuffle(pairs)
        per_prompt.append(pairs)
    order = list(range(len(per_prompt)))
    rng.shuffle(order)
    out: list[Pair] = []
    for rnd in range(max((len(p) for p in per_prompt), default=0)):
        for i in order:
            if rnd < len(per_prompt[i]):
                out.append(per_prompt[i][rnd])
                if len(out) == limit:
                    return out
    return out


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write one JSON object per line, atomically (temp file in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".jsonl")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def write_pairs(path: Path, pairs: Sequence[Pair]) -> Path:
    """A JSONL preference file (prompt, chosen, rejected, gap)."""
    return write_jsonl(path, [asdict(p) for p in pairs])


def write_prompts(path: Path, prompts: Sequence[str]) -> Path:
    """A JSONL prompt file ({"prompt": ...} per line)."""
    return write_jsonl(path, [{"prompt": p} for p in prompts])
