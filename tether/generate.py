"""``tether generate``: sample responses of a trained model to a prompt file, score them, and
measure each one's KL to a reference policy.

For every prompt, n responses are sampled (one seed per (prompt, sample), so the responses do not
depend on the batch size), decoded without special tokens, scored by each reward, and, with a
reference π_ref, measured three ways (all in fp32, at the sampling temperature T: π below is the
model's softmax of logits/T, the distribution it samples from without top-k/top-p)::

    exact = Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t))          full vocabulary at each position
    k1    = Σ_t log π(y_t|…) − log π_ref(y_t|…)              the sampled tokens only
    k3    = Σ_t (r_t − 1) − log r_t,  r_t = π_ref(y_t|…)/π(y_t|…)

(Schulman 2020, "Approximating KL divergence"; :mod:`tether.core.kl`). Over responses y ∼ π the
three have the same mean, the sequence KL(π‖π_ref) of the prompt; ``exact`` has the least
variance (only the prefix is sampled), k1 the most, and k1 alone can be negative.

Each row of the output JSONL::

    {"prompt_index": 3, "sample_index": 0, "prompt": "...", "response": "...",
     "n_tokens": 41, "finished": true, "rewards": {"vader": 0.52},
     "kl": {"exact": 1.83, "k1": 2.10, "k3": 1.77}, "response_ids": [...]}

(``kl`` only with a reference; ``finished``: the response ended with EOS rather than at
max_new_tokens.) :func:`summarize` gives each mean with its standard error over the responses.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.data import PromptExample
from tether.models import SamplingConfig, generate, unwrap_model
from tether.models.generation import sample_seed
from tether.models.numerics import fp32_numerics, weights_are_fp32
from tether.rewards import RewardFn, call_reward

DEFAULT_BATCH_SIZE = 32
"""Sequences per ``generate`` call."""
KL_ESTIMATORS = ("exact", "k1", "k3")


@dataclass(frozen=True)
class NamedReward:
    """A reward function with its spec (for messages) and its short name (the row's key)."""

    name: str
    spec: str
    fn: RewardFn


def generate_rows(
    model: Any,
    tokenizer: Any,
    examples: Sequence[PromptExample],
    sampling: SamplingConfig,
    *,
    n: int = 1,
    rewards: Sequence[NamedReward] = (),
    reference: Any = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Sample ``n`` responses per prompt and score them (see the module docstring).

    Args:
        model: HF causal LM (a PEFT model too); fp32 weights give fp32 KLs.
        tokenizer: its tokenizer.
        examples: the prompts (:func:`tether.data.load_prompt_dataset`).
        sampling: how to sample (temperature, top-k, top-p, max_new_tokens).
        n: responses per prompt (≥ 1).
        rewards: the rewards to score each response with.
        reference: a :class:`tether.reference.ReferencePolicy` (None: no KL).
        batch_size: sequences per ``generate`` call (≥ 1); the responses do not depend on it.
        seed: sample (prompt i, sample j) is drawn with seed ``sample_seed(seed, 0, i·n + j)``.
        on_batch: called with the number of responses done after each batch (progress).

    Returns:
        One row per response, prompt by prompt, sample by sample.
    """
    from tether.eval.heldout import score_responses

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--n must be an integer ≥ 1, got {n!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {batch_size}")
    if not examples:
        raise ValueError("no prompts to generate from")
    base = unwrap_model(model)
    device_type = next(base.parameters()).device.type
    numerics: Callable[[], Any] = (
        (lambda: fp32_numerics(device_type)) if weights_are_fp32(base) else contextlib.nullcontext
    )
    flat = [(i, j, ex) for i, ex in enumerate(examples) for j in range(n)]
    rows: list[dict[str, Any]] = []
    for s in range(0, len(flat), batch_size):
        part = flat[s : s + batch_size]
        seeds = [sample_seed(seed, 0, i * n + j) for i, j, _ in part]
        with numerics():
            ro = generate(
                model,
                tokenizer,
                [list(ex.prompt_ids) for _, _, ex in part],
                sampling,
                compute_logprobs=False,
                compute_sampler_logprobs=False,
                row_seeds=seeds,
            )
        mask = ro.response_mask
        ids = [ro.response_ids[k][mask[k]].tolist() for k in range(mask.shape[0])]
        texts = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
        prompts = [ex.prompt for _, _, ex in part]
        where = {"rows": [ex.index for _, _, ex in part], "stage": "tether generate"}
        scores = {r.name: list(call_reward(r.fn, prompts, texts, r.spec, **where)) for r in rewards}
        kl = None
        if reference is not None:
            kl = score_responses(
                model,
                reference,
                ro.input_ids,
                ro.attention_mask,
                mask,
                ro.prompt_length,
                sampling.temperature,
                numerics,
            )
        for k, (_, j, ex) in enumerate(part):
            row: dict[str, Any] = {
                "prompt_index": ex.index,
                "sample_index": j,
                "prompt": ex.prompt,
                "response": texts[k],
                "n_tokens": len(ids[k]),
                "finished": bool(ro.finished[k]),
                "rewards": {name: v[k] for name, v in scores.items()},
            }
            if kl is not None:
                row["kl"] = {"exact": kl.exact[k], "k1": kl.k1[k], "k3": kl.k3[k]}
            row["response_ids"] = ids[k]
            rows.append(row)
        if on_batch is not None:
            on_batch(len(rows))
    return rows


@dataclass(frozen=True)
class Stat:
    """A mean over responses and its standard error (sample std / √N; NaN for N < 2)."""

    mean: float
    stderr: float
    count: int


def mean_stderr(values: Sequence[float]) -> Stat:
    """:class:`Stat` of the finite ``values`` (NaN mean when there are none)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return Stat(math.nan, math.nan, 0)
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return Stat(m, math.nan, len(xs))
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return Stat(m, math.sqrt(var / len(xs)), len(xs))


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Stat]:
    """Mean ± standard error over the rows of every reward (``reward/<name>``), each KL
    estimate (``kl/exact``, ``kl/k1``, ``kl/k3``) and the response length (``n_tokens``). The
    prompts are taken as fixed: the standard error is over responses to these prompts."""
    out: dict[str, Stat] = {}
    if not rows:
        return out
    for name in rows[0]["rewards"]:
        out[f"reward/{name}"] = mean_stderr([r["rewards"][name] for r in rows])
    if "kl" in rows[0]:
        for est in KL_ESTIMATORS:
            out[f"kl/{est}"] = mean_stderr([r["kl"][est] for r in rows])
    out["n_tokens"] = mean_stderr([r["n_tokens"] for r in rows])
    return out


def format_summary(stats: Mapping[str, Stat]) -> list[str]:
    """The summary as aligned ``name  mean ± se`` lines."""
    width = max((len(k) for k in stats), default=0)
    return [f"  {k:<{width}}  {s.mean:.4f} ± {s.stderr:.4f}" for k, s in stats.items()]


def write_jsonl(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines atomically (a temporary file renamed into place)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out
