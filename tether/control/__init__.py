"""PPO, PPO-penalty and TRPO on gymnasium control tasks, on tether's KL core.

``tether control {ppo,ppo_penalty,trpo} --env CartPole-v1 [key=value ...]`` trains;
``tether control eval RUN_DIR`` runs a saved policy. Needs ``gymnasium`` (``tether[control]``).
"""

from typing import Any

from tether.control.config import (
    ControlConfig,
    PPOControlConfig,
    PPOPenaltyControlConfig,
    TRPOControlConfig,
)

_TRAIN_NAMES = ("ALGORITHMS", "ControlRun", "evaluate_policy", "fit", "load_run", "train")
"""Imported from :mod:`tether.control.train` on first use (PEP 562): the configs need no torch."""


def __getattr__(name: str) -> Any:
    if name in _TRAIN_NAMES:
        import importlib

        module = importlib.import_module("tether.control.train")
        # bind them all: importing the submodule set `tether.control.train` to the module
        globals().update({n: getattr(module, n) for n in _TRAIN_NAMES})
        return globals()[name]
    raise AttributeError(f"module 'tether.control' has no attribute {name!r}")


__all__ = [
    "ALGORITHMS",
    "ControlConfig",
    "ControlRun",
    "PPOControlConfig",
    "PPOPenaltyControlConfig",
    "TRPOControlConfig",
    "evaluate_policy",
    "fit",
    "load_run",
    "train",
]
