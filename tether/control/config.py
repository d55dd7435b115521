"""Config dataclasses of the control trainers (``tether control ppo|ppo_penalty|trpo``).

Defaults are the PPO/TRPO papers' and SB3/sb3-contrib's MuJoCo-style defaults, so a user coming
from SB3 finds the same knobs with the same meaning; recipes in ``recipes/control-*.yaml`` hold
tuned settings per environment. ``max_steps`` counts rollouts (iterations); ``total_timesteps``,
when set, fixes it to ⌈total / (n_envs · n_steps)⌉.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from tether.runs.config import RunConfig, option


@dataclass
class ControlConfig(RunConfig):
    """What every control trainer shares: environments, rollout, networks, normalisation."""

    output_dir: str = option(
        "runs/control",
        help="Run directory: config.yaml, metrics.jsonl, control.json, checkpoints/.",
    )
    max_steps: int = option(
        100, help="Rollouts (iterations) to train for; total_timesteps > 0 sets it instead."
    )
    env: str = option("CartPole-v1", help="gymnasium environment id.")
    env_kwargs: dict[str, Any] | None = option(None, help="Extra gymnasium.make arguments.")
    n_envs: int = option(8, help="Environments stepped per rollout.")
    n_steps: int = option(256, help="Steps per environment per rollout.")
    total_timesteps: int = option(
        0, help="Environment steps to train for (0: max_steps rollouts instead)."
    )
    logging_steps: int = option(1, help="Log metrics every N rollouts.")
    save_steps: int = option(0, help="Checkpoint every N rollouts (0: at the end only).")
    gamma: float = option(0.99, help="Discount γ.")
    gae_lambda: float = option(0.95, help="GAE λ.")
    hidden: list[int] = option([64, 64], help="Hidden layer sizes of the policy and value MLPs.")
    activation: Literal["tanh", "relu"] = option("tanh", help="Hidden activation.")
    ortho_init: bool = option(True, help="Orthogonal initialisation (baselines/SB3).")
    log_std_init: float = option(0.0, help="Initial log σ of a Gaussian policy.")
    normalize_obs: bool = option(False, help="Running observation normalisation.")
    normalize_reward: bool = option(False, help="Divide rewards by the discounted return's std.")
    normalize_advantage: bool = option(True, help="Whiten advantages (per minibatch for SGD).")
    learning_rate: float = option(3e-4, help="Adam learning rate.")
    lr_schedule: Literal["constant", "linear"] = option(
        "constant", help="constant, or linear decay to 0 over the run."
    )
    max_grad_norm: float | None = option(0.5, help="Clip the gradient norm (null: off).")
    target_return: float | None = option(
        None, help="Stop once the mean return of the last return_window episodes reaches it."
    )
    return_window: int = option(20, help="Episodes in the rolling mean return.")
    eval_episodes: int = option(
        10, help="Deterministic evaluation episodes at the end (logged as eval_return)."
    )
    torch_threads: int = option(1, help="torch threads (1 is fastest for small MLPs).")
    max_bad_steps: int = option(
        10,
        help="An update with a non-finite loss or gradient norm is skipped (bad_steps); this "
        "many rollouts in a row with skipped updates stop the run, its last checkpoint kept.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_envs", "n_steps", "return_window", "torch_threads", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("total_timesteps", "eval_episodes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty list of sizes ≥ 1, got {self.hidden}")
        if not self.env:
            raise ValueError("env must be a gymnasium environment id, got ''")
        if not 0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            # A negative max_norm makes the clip coefficient negative: gradient ascent.
            raise ValueError(
                f"max_grad_norm must be a finite number > 0 or null (off), got {self.max_grad_norm}"
            )
        if not math.isfinite(self.log_std_init):
            raise ValueError(f"log_std_init must be a finite number, got {self.log_std_init}")
        if self.target_return is not None and not math.isfinite(self.target_return):
            raise ValueError(
                f"target_return must be a finite number or null (off), got {self.target_return}"
            )
        if self.total_timesteps:
            self.max_steps = max(1, math.ceil(self.total_timesteps / self.rollout_size))

    @property
    def rollout_size(self) -> int:
        return self.n_envs * self.n_steps


@dataclass
class SGDConfig(ControlConfig):
    """Epochs of minibatch Adam on the rollout (PPO and PPO-penalty)."""

    n_epochs: int = option(10, help="Passes over each rollout.")
    batch_size: int = option(64, help="Minibatch size (samples).")
    ent_coef: float = option(0.0, help="Entropy bonus coefficient.")
    vf_coef: float = option(
        0.5, help="Value loss coefficient (on ½(V−R)²; separate networks make it minor)."
    )
    clip_range_vf: float | None = option(None, help="Value clipping range (null: off).")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not math.isfinite(self.ent_coef):
            raise ValueError(f"ent_coef must be a finite number, got {self.ent_coef}")
        if not 0 <= self.vf_coef < math.inf:
            raise ValueError(f"vf_coef must be a finite number ≥ 0, got {self.vf_coef}")
        if self.clip_range_vf is not None and not 0 < self.clip_range_vf < math.inf:
            raise ValueError(
                f"clip_range_vf must be a finite number > 0 or null (off), got {self.clip_range_vf}"
            )
        if self.batch_size > self.rollout_size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than a rollout "
                f"(n_envs·n_steps = {self.rollout_size})"
            )


@dataclass
class PPOControlConfig(SGDConfig):
    """Clipped PPO (Schulman et al. 2017, eq. 7)."""

    clip_range: float = option(0.2, help="ε of the clipped ratio.")
    clip_schedule: Literal["constant", "linear"] = option(
        "constant", help="constant, or ε decays linearly to 0."
    )
    target_kl: float | None = option(
        None, help="Stop the epochs when a minibatch's KL(old‖new) exceeds 1.5× this."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.clip_range < math.inf:
            raise ValueError(f"clip_range must be a finite number > 0, got {self.clip_range}")
        if self.target_kl is not None and not 0 < self.target_kl < math.inf:
            raise ValueError(
                f"target_kl must be a finite number > 0 or null (off), got {self.target_kl}"
            )


@dataclass
class PPOPenaltyControlConfig(SGDConfig):
    """PPO with the adaptive KL penalty (Schulman et al. 2017, §4, eq. 8)."""

    kl_coef: float = option(1.0, help="Initial β of the penalty β·KL(π_old‖π_θ).")
    kl_target: float = option(0.01, help="d_targ: the KL per update the rule aims for.")
    kl_tolerance: float = option(1.5, help="β moves when KL leaves [d/tol, d·tol].")
    kl_factor: float = option(2.0, help="β is halved/doubled by this factor.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("kl_coef", "kl_target"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("kl_tolerance", "kl_factor"):
            if not 1 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 1, got {getattr(self, name)}")


@dataclass
class TRPOControlConfig(ControlConfig):
    """TRPO (Schulman et al. 2015): natural step by CG, KL-constrained line search."""

    n_steps: int = option(256, help="Steps per environment per rollout.")
    learning_rate: float = option(1e-3, help="Adam learning rate of the value function.")
    max_kl: float = option(0.01, help="δ: the trust region's KL(π_old‖π_new) bound.")
    cg_iters: int = option(15, help="Conjugate-gradient iterations.")
    cg_damping: float = option(0.1, help="Damping added to the Fisher matrix.")
    backtrack_ratio: float = option(0.8, help="Line-search shrink factor.")
    max_backtracks: int = option(10, help="Line-search tries.")
    vf_iters: int = option(10, help="Epochs of value regression per rollout.")
    vf_batch_size: int = option(128, help="Minibatch size of the value regression.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.max_kl < math.inf:
            raise ValueError(f"max_kl must be a finite number > 0, got {self.max_kl}")
        if not 0 <= self.cg_damping < math.inf:
            raise ValueError(f"cg_damping must be a finite number ≥ 0, got {self.cg_damping}")
        for name in ("cg_iters", "max_backtracks", "vf_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.vf_iters < 0:
            raise ValueError(f"vf_iters must be ≥ 0, got {self.vf_iters}")
        if not 0 < self.backtrack_ratio < 1:
            raise ValueError(f"backtrack_ratio must be in (0, 1), got {self.backtrack_ratio}")


CONFIGS: dict[str, type[ControlConfig]] = {
    "ppo": PPOControlConfig,
    "ppo_penalty": PPOPenaltyControlConfig,
    "trpo": TRPOControlConfig,
}
"""Algorithm name → config class, without importing the trainer (``--help-config`` needs no
torch)."""
