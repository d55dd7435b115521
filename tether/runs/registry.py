"""The algorithms ``tether train ALGO`` knows: plain dicts of name → lazy loader.

Two loaders per algorithm, both taking no arguments:

* :data:`TRAINERS` — imports the trainer module (torch, transformers, accelerate: ≈10 s) and
  returns ``(ConfigClass, train_fn)``: the config dataclass (a
  :class:`tether.runs.config.RunConfig` subclass) and the function that trains from an instance.
  Only training calls it.
* :data:`CONFIGS` — imports only the config module in :mod:`tether.configs` (no torch) and returns
  the same class. ``--help-config`` and ``--print-config`` use it (:func:`get_config`), so they
  answer in well under a second.

Adding an algorithm (e.g. ``sft``): put its config dataclass in ``tether/configs/sft.py`` (the
rules of :mod:`tether.configs`: no torch/transformers/accelerate/datasets imports at module
level), import it in the trainer module (``from tether.configs.sft import SFTConfig``, so
``tether.train.sft.SFTConfig`` is the same class), then add both loaders and a summary here::

    def _sft() -> TrainerSpec:
        from tether.train.sft import SFTConfig, train

        return SFTConfig, train

    def _sft_config() -> type:
        from tether.configs.sft import SFTConfig

        return SFTConfig

    TRAINERS["sft"] = _sft
    CONFIGS["sft"] = _sft_config

``tests/runs/test_startup.py`` checks, for every algorithm in :data:`TRAINERS`, that
``--help-config`` and ``--print-config`` import no torch and that both loaders give the same class.
From outside the package (plugins, tests) use :func:`register_trainer`; without a ``config``
loader, :func:`get_config` falls back to the trainer loader (correct, only slower).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from tether.errors import TetherError

TrainerSpec = tuple[type, Callable[[Any], Any]]
"""(config dataclass, train function taking an instance of it)."""
TrainerLoader = Callable[[], TrainerSpec]
ConfigLoader = Callable[[], type]

TRAINERS: dict[str, TrainerLoader] = {}
"""Algorithm name → zero-argument loader returning ``(ConfigClass, train_fn)``."""
CONFIGS: dict[str, ConfigLoader] = {}
"""Algorithm name → zero-argument loader returning its config class from :mod:`tether.configs`
(no torch import)."""


class UnknownTrainerError(TetherError, KeyError):
    """``tether train`` was given an algorithm name that is not in :data:`TRAINERS`."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


SUMMARIES: dict[str, str] = {
    "sft": "supervised fine-tuning (prompt/completion, messages or text): the reference model",
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


def register_trainer(
    name: str, loader: TrainerLoader, summary: str = "", config: ConfigLoader | None = None
) -> None:
    """Add an algorithm to :data:`TRAINERS` (its one-line ``summary`` to :data:`SUMMARIES`, and
    a ``config`` loader that imports no torch to :data:`CONFIGS`); a name already taken is an
    error."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"trainer name {name!r} must be letters, digits, '_' or '-'")
    if name in TRAINERS:
        raise ValueError(f"a trainer named {name!r} is already registered")
    TRAINERS[name] = loader
    if summary:
        SUMMARIES[name] = summary
    if config is not None:
        CONFIGS[name] = config


def algorithms_help() -> str:
    """Every registered algorithm with its one line, for ``tether train --help``."""
    width = max((len(n) for n in TRAINERS), default=0)
    lines = ["algorithms:"]
    for name in TRAINERS:
        lines.append(f"  {name:<{width}}  {SUMMARIES.get(name, '')}".rstrip())
    return "\n".join(lines)


def _check_known(name: str) -> None:
    """Raise :class:`UnknownTrainerError` (close matches, every known algorithm) unless ``name``
    is registered."""
    if name not in TRAINERS:
        known = sorted(TRAINERS)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" did you mean {' or '.join(map(repr, close))}?" if close else ""
        listing = ", ".join(known) if known else "none registered yet"
        raise UnknownTrainerError(f"unknown algorithm {name!r};{hint} known algorithms: {listing}")


def get_trainer(name: str) -> TrainerSpec:
    """Load the trainer ``name``: ``(ConfigClass, train_fn)`` (imports torch).

    Raises:
        UnknownTrainerError: ``name`` is not registered; the message lists close matches and
            every known algorithm.
    """
    _check_known(name)
    return TRAINERS[name]()


def get_config(name: str) -> type:
    """The config class of algorithm ``name``, without importing its trainer where
    :data:`CONFIGS` has a loader for it (else from :data:`TRAINERS`: the same class, slower).

    Raises:
        UnknownTrainerError: as :func:`get_trainer`.
    """
    _check_known(name)
    loader = CONFIGS.get(name)
    return loader() if loader is not None else TRAINERS[name]()[0]


def _sft() -> TrainerSpec:
    from tether.train.sft import SFTConfig, train

    return SFTConfig, train


TRAINERS["sft"] = _sft


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


# Config-only loaders (tether.configs, no torch): --help-config and --print-config.


def _sft_config() -> type:
    from tether.configs.sft import SFTConfig

    return SFTConfig


def _dpo_config() -> type:
    from tether.configs.dpo import DPOConfig

    return DPOConfig


def _reward_config() -> type:
    from tether.configs.reward_model import RewardConfig

    return RewardConfig


def _online_dpo_config() -> type:
    from tether.configs.online_dpo import OnlineDPOConfig

    return OnlineDPOConfig


def _ppo_config() -> type:
    from tether.configs.ppo import PPOConfig

    return PPOConfig


def _ppo_penalty_config() -> type:
    from tether.configs.ppo import PPOPenaltyConfig

    return PPOPenaltyConfig


def _grpo_config() -> type:
    from tether.configs.grpo import GRPOConfig

    return GRPOConfig


def _rloo_config() -> type:
    from tether.configs.grpo import RLOOConfig

    return RLOOConfig


def _trpo_config() -> type:
    from tether.configs.trpo import TRPOConfig

    return TRPOConfig


CONFIGS.update(
    sft=_sft_config,
    dpo=_dpo_config,
    reward=_reward_config,
    online_dpo=_online_dpo_config,
    ppo=_ppo_config,
    ppo_penalty=_ppo_penalty_config,
    grpo=_grpo_config,
    rloo=_rloo_config,
    trpo=_trpo_config,
)
