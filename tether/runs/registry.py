"""The algorithms ``tether train ALGO`` knows: a plain dict of name → lazy loader.

A loader takes no arguments, imports its trainer module (so ``tether --help`` and the other
commands never import every trainer) and returns ``(ConfigClass, train_fn)``: the config
dataclass (a :class:`tether.runs.config.RunConfig` subclass) and the function that trains from a
config instance. A trainer module adds itself with a function in this file::

    def _dpo() -> TrainerSpec:
        from tether.train.dpo import DPOConfig, train

        return DPOConfig, train

    TRAINERS["dpo"] = _dpo

or, from outside the package (plugins, tests), with :func:`register_trainer`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from tether.errors import TetherError

TrainerSpec = tuple[type, Callable[[Any], Any]]
"""(config dataclass, train function taking an instance of it)."""
TrainerLoader = Callable[[], TrainerSpec]

TRAINERS: dict[str, TrainerLoader] = {}
"""Algorithm name → zero-argument loader returning ``(ConfigClass, train_fn)``."""


class UnknownTrainerError(TetherError, KeyError):
    """``tether train`` was given an algorithm name that is not in :data:`TRAINERS`."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


SUMMARIES: dict[str, str] = {
    "dpo": "offline DPO family (sigmoid, IPO, hinge, robust, χ²PO, …) on preference pairs",
    "reward": "Bradley–Terry reward model on preference pairs",
    "online_dpo": "online DPO: pairs sampled from the policy, ranked by a judge reward",
    "ppo": "PPO with a critic and a KL penalty (fixed, adaptive or PID β)",
    "ppo_penalty": "PPO-penalty: the KL to π_old as a penalty with PPO's β rule, no clipping",
    "grpo": "GRPO: group-relative advantages over G samples per prompt, no critic",
    "rloo": "RLOO: leave-one-out baselines over G samples per prompt",
    "trpo": "TRPO for LMs: natural-gradient steps inside a KL trust region",
}
"""Algorithm name → one line for ``tether train --help`` (no trainer module is imported)."""


def register_trainer(name: str, loader: TrainerLoader, summary: str = "") -> None:
    """Add an algorithm to :data:`TRAINERS` (and its one-line ``summary`` to
    :data:`SUMMARIES`); a name already taken is an error."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"trainer name {name!r} must be letters, digits, '_' or '-'")
    if name in TRAINERS:
        raise ValueError(f"a trainer named {name!r} is already registered")
    TRAINERS[name] = loader
    if summary:
        SUMMARIES[name] = summary


def algorithms_help() -> str:
    """Every registered algorithm with its one line, for ``tether train --help``."""
    width = max((len(n) for n in TRAINERS), default=0)
    lines = ["algorithms:"]
    for name in TRAINERS:
        lines.append(f"  {name:<{width}}  {SUMMARIES.get(name, '')}".rstrip())
    return "\n".join(lines)


def get_trainer(name: str) -> TrainerSpec:
    """Load the trainer ``name``: ``(ConfigClass, train_fn)``.

    Raises:
        UnknownTrainerError: ``name`` is not registered; the message lists close matches and
            every known algorithm.
    """
    if name not in TRAINERS:
        known = sorted(TRAINERS)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" did you mean {' or '.join(map(repr, close))}?" if close else ""
        listing = ", ".join(known) if known else "none registered yet"
        raise UnknownTrainerError(f"unknown algorithm {name!r};{hint} known algorithms: {listing}")
    return TRAINERS[name]()


def _dpo() -> TrainerSpec:
    from tether.train.dpo import DPOConfig, train

    return DPOConfig, train


TRAINERS["dpo"] = _dpo


def _reward() -> TrainerSpec:
    from tether.train.reward_model import RewardConfig, train

    return RewardConfig, train


TRAINERS["reward"] = _reward


def _online_dpo() -> TrainerSpec:
    from tether.train.online_dpo import OnlineDPOConfig, train

    return OnlineDPOConfig, train


TRAINERS["online_dpo"] = _online_dpo


def _ppo() -> TrainerSpec:
    from tether.train.ppo import PPOConfig, train

    return PPOConfig, train


TRAINERS["ppo"] = _ppo


def _ppo_penalty() -> TrainerSpec:
    from tether.train.ppo import PPOPenaltyConfig, train

    return PPOPenaltyConfig, train


TRAINERS["ppo_penalty"] = _ppo_penalty


def _grpo() -> TrainerSpec:
    from tether.train.grpo import GRPOConfig, train

    return GRPOConfig, train


TRAINERS["grpo"] = _grpo


def _rloo() -> TrainerSpec:
    from tether.train.grpo import RLOOConfig, train

    return RLOOConfig, train


TRAINERS["rloo"] = _rloo


def _trpo() -> TrainerSpec:
    from tether.train.trpo import TRPOConfig, train

    return TRPOConfig, train


TRAINERS["trpo"] = _trpo
