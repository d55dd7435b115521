"""``tether eval``: the held-out evaluation of :mod:`tether.eval.heldout` on any saved model.

The same :class:`~tether.eval.heldout.HeldOutEvaluator` a trainer runs every ``eval_steps``, run
once on a run's ``final/`` (or ``best/``, or a training checkpoint), a model directory, an
embedded model or a hub id: proxy and gold rewards, the KL to the reference (exact, k1, k3),
entropy, diversity (distinct-n, EAD, self-BLEU, semantic similarity), capability NLL and its tax,
the off-task KL. The settings start from the run's ``config.yaml`` (its eval prompts, rewards,
sampling and eval options, so the numbers continue the run's ``eval/`` curves) and the options
given override them. Without a reference the KL and tax metrics are left out (they would be 0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tether
from tether.eval.heldout import SAMPLES_DIR, EvalConfig, samples_path, split_eval_prompts
from tether.runs.config import ConfigError, option

REFERENCE_METRICS = ("eval/kl/", "eval/ref_nll", "eval/nll_tax")
"""Metrics that compare with the reference (dropped when there is none)."""
SINGLE_EVAL_METRICS = ("eval/proxy_gold_gap", "eval/seconds")
"""Metrics of a training curve that mean nothing for one evaluation (the gap is 0 by definition
at the first one)."""


@dataclass
class StandaloneEvalConfig(EvalConfig):
    """What a held-out evaluation needs besides :class:`EvalConfig`: the sampling and prompt
    settings a trainer's config carries."""

    seed: int = option(0, help="Sampling seed (the samples are seeded per prompt and sample).")
    max_new_tokens: int = option(48, help="Response length cap.")
    temperature: float = option(1.0, help="Sampling temperature.")
    top_k: int = option(0, help="Top-k sampling (0: off).")
    top_p: float = option(1.0, help="Nucleus sampling mass (1: off).")
    as_chat: bool = option(False, help="Wrap plain-string prompts as a user message.")
    max_prompt_length: int = option(256, help="Max prompt tokens; a longer prompt is an error.")
    eval_steps: int = option(1, help="(Always 1 here: one evaluation.)")

    def __post_init__(self) -> None:
        self.check_eval()
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max-new-tokens must be ≥ 1, got {self.max_new_tokens}")


def eval_config(
    run_config: Mapping[str, Any] | None, overrides: Mapping[str, Any]
) -> StandaloneEvalConfig:
    """The run's settings (those :class:`StandaloneEvalConfig` has) with ``overrides`` (fields
    whose value is not None) on top; early stopping and the base cache off.

    Raises:
        ConfigError: a value is out of range (names the field).
    """
    names = {f.name for f in dataclasses.fields(StandaloneEvalConfig)}
    values = {k: v for k, v in (run_config or {}).items() if k in names}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.update(eval_steps=1, early_stop_on=None, eval_base_cache=None, eval_generate=True)
    try:
        return StandaloneEvalConfig(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"tether eval: {e}") from e


def run_eval_prompts(
    run_config: Mapping[str, Any], cfg: StandaloneEvalConfig, tokenizer: Any
) -> tuple[list[Any], str]:
    """The held-out prompts the run evaluated on: its ``eval_prompts`` file, else the seeded
    split of its training ``prompts`` that the trainer held out; and a description.

    Raises:
        ConfigError: the run names neither (e.g. a DPO run): give --prompts.
    """
    from tether.data import load_prompt_dataset

    load = dict(max_prompt_length=cfg.max_prompt_length, as_chat=cfg.as_chat)
    if cfg.eval_prompts:
        return list(load_prompt_dataset(cfg.eval_prompts, tokenizer, **load)), cfg.eval_prompts
    prompts = run_config.get("prompts")
    if not isinstance(prompts, str) or not prompts:
        raise ConfigError(
            "--prompts is required: the run names no eval_prompts and no training prompts to "
            "hold out from (e.g. a preference run)"
        )
    examples = list(load_prompt_dataset(prompts, tokenizer, **load))
    seed = int(run_config.get("seed", 0))  # the trainer's split, whatever seed samples now
    _, held = split_eval_prompts(examples, min(cfg.eval_num_prompts, len(examples)), seed, 0)
    return held, f"{prompts} (the run's {len(held)} held-out prompts)"


def evaluate_once(
    model: Any,
    tokenizer: Any,
    reference: Any,
    cfg: StandaloneEvalConfig,
    prompts: Sequence[Any],
    proxy: str | None,
    *,
    step: int = 0,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """One held-out evaluation of ``model`` against ``reference`` (a ``ReferencePolicy``; None:
    ``model`` itself, and the metrics that compare with it are dropped). Returns the metrics and
    the per-sample records (prompt, completion, rewards, KLs, per-token log-probs)."""
    from tether.eval.heldout import HeldOutEvaluator
    from tether.trained import model_reference

    with tempfile.TemporaryDirectory(prefix="tether-eval-") as tmp:
        evaluator = HeldOutEvaluator(cfg, tokenizer, prompts, proxy, Path(tmp), None)
        evaluator.note = lambda _text: None
        ref = reference if reference is not None else model_reference(model)
        metrics = evaluator.evaluate(model, ref, step)
        path = samples_path(Path(tmp) / SAMPLES_DIR, step)
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    drop = SINGLE_EVAL_METRICS + (REFERENCE_METRICS if reference is None else ())
    metrics = {k: v for k, v in metrics.items() if not k.startswith(drop)}
    return metrics, records


def format_table(metrics: Mapping[str, float]) -> list[str]:
    """The metrics as aligned ``name  value`` lines (without the ``eval/`` prefix)."""
    names = {k: k.removeprefix("eval/") for k in metrics}
    width = max((len(n) for n in names.values()), default=0)
    return [f"  {names[k]:<{width}}  {v:.4f}" for k, v in metrics.items()]


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON atomically (temporary file + rename); NaN as null."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean = _finite(json.loads(json.dumps(data, default=str)))
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(clean, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, out)
    return out


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def report(
    *,
    model: str,
    checkpoint: str | None,
    step: int | None,
    reference: str | None,
    prompts: str,
    cfg: StandaloneEvalConfig,
    proxy: str | None,
    metrics: Mapping[str, float],
    samples: str | None,
) -> dict[str, Any]:
    """The JSON ``tether eval`` writes: what was evaluated, how, and the metrics."""
    return {
        "model": model,
        "checkpoint": checkpoint,
        "step": step,
        "reference": reference,
        "prompts": prompts,
        "proxy": proxy,
        "eval_rewards": list(cfg.eval_rewards),
        "settings": {
            k: getattr(cfg, k)
            for k in (
                "eval_num_prompts",
                "eval_samples_per_prompt",
                "seed",
                "max_new_tokens",
                "temperature",
                "top_k",
                "top_p",
                "as_chat",
                "eval_capability_text",
                "eval_offtask_prompts",
                "eval_semantic",
            )
        },
        "metrics": dict(metrics),
        "samples": samples,
        "tether_version": tether.__version__,
    }
