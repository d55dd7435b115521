"""Held-out evaluation fields shared by the LM trainers (:class:`EvalConfig`); the evaluator that
reads them is :class:`tether.eval.heldout.HeldOutEvaluator`, which re-exports this class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tether.configs.checks import reward_names
from tether.runs.config import option

BUILTIN_TEXT = "general"
"""``eval_capability_text`` / ``eval_offtask_prompts`` value naming the corpus tether ships."""


@dataclass
class EvalConfig:
    """Held-out evaluation fields shared by the LM trainers (``eval_steps`` is each trainer's own:
    0 turns held-out sampling off). Call :meth:`check_eval` from ``__post_init__``."""

    eval_prompts: str | None = option(
        None,
        help="Held-out prompt file (a 'prompt' column); null: eval_num_prompts training prompts "
        "held out by a seeded split (DPO: the held-out pairs' prompts).",
    )
    eval_num_prompts: int = option(8, help="Held-out prompts per evaluation (at most).")
    eval_samples_per_prompt: int = option(4, help="Completions sampled per held-out prompt.")
    eval_rewards: list[str] = option(
        [],
        help="Gold rewards measured on the eval samples and never optimised: built-in names, "
        "reward-model dirs or module:function specs.",
    )
    eval_max_new_tokens: int | None = option(
        None, help="Response length cap of eval samples (null: the training max_new_tokens)."
    )
    eval_capability_text: str | None = option(
        BUILTIN_TEXT,
        help="General text for the capability NLL: 'general' (shipped), a JSONL/JSON/CSV/Parquet "
        "file with a 'text' column, or null (off).",
    )
    eval_capability_passages: int = option(48, help="Passages of it used (the first N).")
    eval_offtask_prompts: str | None = option(
        BUILTIN_TEXT,
        help="Off-task prompts for the exact KL outside the task: 'general' (shipped), a prompt "
        "file, or null (off).",
    )
    eval_offtask_num: int = option(8, help="Off-task prompts used (one sample each).")
    eval_semantic: bool = option(
        True, help="Semantic similarity among completions (all-MiniLM-L6-v2, fetched once)."
    )
    eval_batch_size: int = option(32, help="Sequences per eval sampling/scoring batch.")
    eval_base_cache: str | None = option(
        None,
        help="Directory caching the step-0 evaluation of the untrained policy, keyed by model, "
        "prompts and eval settings: runs that share them evaluate the base once (one process).",
    )
    eval_generate: bool = option(
        True,
        help="Sample the held-out prompts at each evaluation (gold rewards, KL, diversity, "
        "capability); false: only the trainer's cheap held-out metrics.",
    )
    overopt_window: int = option(
        3, help="Evaluations over which the proxy-up/gold-down warning looks."
    )
    early_stop_on: str | None = option(
        None, help="Stop when this eval metric (e.g. eval/gold/afinn) stops improving (null: off)."
    )
    early_stop_mode: Literal["max", "min"] = option(
        "max", help="Whether early_stop_on improves upwards (max) or downwards (min)."
    )
    early_stop_patience: int = option(
        3, help="Evaluations without improvement before stopping; best/ keeps the best policy."
    )

    def check_eval(self) -> None:
        for name in ("eval_num_prompts", "eval_samples_per_prompt", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("eval_capability_passages", "eval_offtask_num"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"{name} must be ≥ 1 (turn it off with null), got {getattr(self, name)}"
                )
        if self.eval_max_new_tokens is not None and self.eval_max_new_tokens < 1:
            raise ValueError(f"eval_max_new_tokens must be ≥ 1, got {self.eval_max_new_tokens}")
        if self.overopt_window < 2:
            raise ValueError(f"overopt_window must be ≥ 2, got {self.overopt_window}")
        if self.early_stop_patience < 1:
            raise ValueError(f"early_stop_patience must be ≥ 1, got {self.early_stop_patience}")
        if self.early_stop_on is not None and not self.early_stop_on.startswith("eval/"):
            raise ValueError(
                f"early_stop_on must name an eval metric (eval/...), got {self.early_stop_on!r}"
            )
        if getattr(self, "eval_steps", 1) < 0:
            raise ValueError(f"eval_steps must be ≥ 0 (0: off), got {self.eval_steps}")  # type: ignore[attr-defined]
        if self.early_stop_on is not None and getattr(self, "eval_steps", 1) == 0:
            raise ValueError("early_stop_on needs held-out evaluation: set eval_steps ≥ 1")
        reward_names(list(self.eval_rewards))  # duplicate names are an error now, not later
