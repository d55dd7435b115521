"""The configs of PPO and PPO-penalty (``tether train ppo`` / ``ppo_penalty``), trained by
:func:`tether.train.ppo.train` (which re-exports them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tether.configs.literals import Aggregation
from tether.configs.rl import RLConfig
from tether.runs.config import option


@dataclass
class PPOConfig(RLConfig):
    """PPO with a value head and a KL penalty to the reference."""

    ppo_epochs: int = option(4, help="Passes over each rollout.")
    num_mini_batches: int = option(1, help="Mini-batches (optimizer steps) per pass.")
    clip_eps: float = option(0.2, help="ε of the clipped surrogate.")
    clip_eps_high: float | None = option(None, help="Upper ε (DAPO clip-higher); null: = ε.")
    vf_coef: float = option(0.1, help="Weight of the value loss.")
    value_clip: float | None = option(0.2, help="Value clipping range (null: off).")
    gamma: float = option(1.0, help="Discount over tokens.")
    lam: float = option(0.95, help="GAE λ.")
    whiten_advantages: bool = option(True, help="Whiten advantages over the response tokens.")
    entropy_coef: float = option(0.0, help="Entropy bonus weight.")
    loss_aggregation: Aggregation = option(
        "token_mean", help="token_mean | seq_mean | seq_sum (see tether.core.masked.aggregate)."
    )
    target_kl: float | None = option(
        None, help="Stop an iteration's epochs when KL(old‖new) per token > 1.5 × this."
    )
    learning_rate: float = option(1e-6, help="AdamW peak learning rate.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("ppo_epochs", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0 < self.clip_eps < math.inf:
            raise ValueError(f"clip_eps must be a finite number > 0, got {self.clip_eps}")
        for name in ("clip_eps_high", "value_clip", "target_kl"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0 or null (off), got {value}")
        if not 0 <= self.vf_coef < math.inf:
            raise ValueError(f"vf_coef must be a finite number ≥ 0, got {self.vf_coef}")
        if not math.isfinite(self.entropy_coef):
            raise ValueError(f"entropy_coef must be a finite number, got {self.entropy_coef}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        n = self.rollout_size
        if n % self.num_mini_batches:
            raise ValueError(
                f"the rollout ({self.batch_size} prompts × {self.num_generations} generations = "
                f"{n}) must split into num_mini_batches={self.num_mini_batches} equal parts"
            )
        if (n // self.num_mini_batches) % self.gradient_accumulation_steps:
            raise ValueError(
                f"a mini-batch of {n // self.num_mini_batches} sequences must split into "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} micro-batches"
            )

    @property
    def algorithm(self) -> str:
        return "ppo"


@dataclass
class PPOPenaltyConfig(PPOConfig):
    """PPO with the adaptive KL(π_old‖π_θ) penalty of §4 instead of clipping."""

    penalty_beta: float = option(1.0, help="Initial β of the KL(old‖new) penalty.")
    penalty_target: float = option(0.01, help="d_targ: KL(old‖new) per token per update.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("penalty_beta", "penalty_target"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")

    @property
    def algorithm(self) -> str:
        return "ppo_penalty"
