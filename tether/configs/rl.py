"""The config every on-policy LM trainer shares (:class:`RLConfig`, trained through
:func:`tether.train.rl.train_loop`, which re-exports it) and where the reference KL goes
(:data:`KLPlacement`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from tether.configs.checks import check_horizon
from tether.configs.common import SamplingTrainConfig
from tether.configs.literals import Estimator
from tether.runs.config import option

KLPlacement = Literal["reward", "loss", "none"]


@dataclass
class RLConfig(SamplingTrainConfig):
    """Fields every on-policy LM trainer shares. ``batch_size`` is prompts per iteration."""

    reward: str = option(
        "vader", help="Reward: built-in name, reward-model dir, or module:function."
    )
    reward_on_invalid: Literal["raise", "skip"] = option(
        "raise", help="A NaN/inf reward: raise (naming the sample) or skip the sample and count it."
    )
    num_generations: int = option(1, help="G: completions sampled per prompt.")
    kl_in: KLPlacement = option(
        "reward", help="Where the reference KL goes: reward (shaped), loss (β·ρ·k), or none."
    )
    kl_estimator: Estimator = option(
        "k1", help="Per-token KL estimator: k1 | k2 | k3 | abs (kl_in=loss: k1 or k3)."
    )
    kl_coef: float = option(0.05, help="β, or the initial β of an adaptive/PID controller.")
    kl_controller: Literal["fixed", "adaptive", "pid"] = option(
        "fixed", help="How β moves: fixed, adaptive (Ziegler 2019) or PID to kl_target."
    )
    kl_target: float = option(6.0, help="KL to reference (nats per response) adaptive/PID hold.")
    kl_horizon: float = option(10000.0, help="Adaptive controller horizon, in samples.")
    pid_kp: float = option(0.1, help="PID proportional gain (β per unit relative KL error).")
    pid_ki: float = option(0.05, help="PID integral gain.")
    pid_kd: float = option(0.0, help="PID derivative gain.")
    reference: Literal["copy", "adapter"] = option(
        "copy", help="Reference: frozen copy, or the base model with LoRA disabled."
    )
    exact_kl_samples: int = option(
        2,
        help="Responses per iteration and process on which the exact (full-vocabulary) KL is "
        "computed.",
    )
    tis_cap: float | None = option(
        None,
        help="Truncated importance sampling between sampler and trainer: weight each token's "
        "policy-gradient term by min(π_train/π_sampler, tis_cap) (null: off; 2 is common).",
    )
    learning_rate: float = option(1e-6, help="AdamW peak learning rate.")
    kl_max: float | None = option(
        None,
        help="KL ceiling (nats per response, kl_estimator's units): an update after which the "
        "policy's KL to the reference exceeds it is rolled back and logged (null: off).",
    )
    kl_warn_factor: float = option(
        3.0,
        help="Warn when the measured KL stays above this × kl_target for kl_warn_iterations "
        "updates while β does not move (0: off).",
    )
    kl_warn_iterations: int = option(5, help="Updates in a row for the kl_warn_factor warning.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be ≥ 1, got {self.num_generations}")
        if not 0 <= self.kl_coef < math.inf:
            raise ValueError(f"kl_coef must be a finite number ≥ 0, got {self.kl_coef}")
        for name in ("kl_target", "kl_horizon"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("pid_kp", "pid_ki", "pid_kd"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number ≥ 0, got {getattr(self, name)}")
        if self.kl_in == "loss" and self.kl_estimator not in ("k1", "k3"):
            raise ValueError(
                f"kl_in=loss needs kl_estimator k1 or k3 (with the importance weight their "
                f"gradient is the KL's; {self.kl_estimator} has none), got {self.kl_estimator!r}"
            )
        if self.kl_controller != "fixed" and self.kl_in == "none":
            raise ValueError("kl_controller adapts β, but kl_in=none applies no KL penalty")
        if self.kl_controller == "adaptive" and self.kl_coef <= 0:
            raise ValueError(
                f"kl_coef must be > 0 with kl_controller=adaptive (it multiplies β), "
                f"got {self.kl_coef}"
            )
        if self.kl_controller == "adaptive" and self.kl_in != "none":
            # n_steps is global (× processes): AdaptiveKL.update checks that at the first step.
            check_horizon(
                self.kl_horizon,
                self.rollout_size,
                name="kl_horizon",
                steps="batch_size·num_generations",
                note="the samples per update of one process; N processes need N times more",
            )
        if self.exact_kl_samples < 0:
            raise ValueError(f"exact_kl_samples must be ≥ 0, got {self.exact_kl_samples}")
        if self.tis_cap is not None and not 0 < self.tis_cap < math.inf:
            raise ValueError(
                f"tis_cap must be a finite number > 0 or null (off), got {self.tis_cap}"
            )
        if self.kl_max is not None and not 0 < self.kl_max < math.inf:
            raise ValueError(f"kl_max must be a finite number > 0 or null (off), got {self.kl_max}")
        if not 0 <= self.kl_warn_factor < math.inf:
            raise ValueError(
                f"kl_warn_factor must be a finite number ≥ 0 (0: off), got {self.kl_warn_factor}"
            )
        if self.kl_warn_iterations < 1:
            raise ValueError(f"kl_warn_iterations must be ≥ 1, got {self.kl_warn_iterations}")

    @property
    def rollout_size(self) -> int:
        """N = prompts × generations per iteration (per process)."""
        return self.batch_size * self.num_generations
