"""PPO, PPO-penalty and TRPO on gymnasium control tasks, on tether's KL core.

``tether control {ppo,ppo_penalty,trpo} --env CartPole-v1 [key=value ...]`` trains;
``tether control eval RUN_DIR`` runs a saved policy. Needs ``gymnasium`` (``tether[control]``).
"""

from tether.control.config import (
    ControlConfig,
    PPOControlConfig,
    PPOPenaltyControlConfig,
    TRPOControlConfig,
)
from tether.control.train import ALGORITHMS, ControlRun, evaluate_policy, fit, load_run, train

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
