"""The configs of GRPO and RLOO (``tether train grpo`` / ``rloo``), trained by
:func:`tether.train.grpo.train` (which re-exports them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tether.configs.literals import Aggregation, Estimator
from tether.configs.rl import KLPlacement, RLConfig
from tether.runs.config import option


@dataclass
class GRPOConfig(RLConfig):
    """GRPO: group-relative advantages, KL to the reference in the loss."""

    num_generations: int = option(8, help="G: completions per prompt (the group).")
    kl_in: KLPlacement = option("loss", help="Where the reference KL goes: loss, reward or none.")
    kl_estimator: Estimator = option("k3", help="KL estimator (kl_in=loss: k1 or k3).")
    kl_coef: float = option(0.04, help="β (initial β of an adaptive/PID controller).")
    scale_rewards: bool = option(True, help="Divide by the group std (False: Dr. GRPO).")
    ppo_epochs: int = option(1, help="μ: passes over each rollout.")
    num_mini_batches: int = option(1, help="Mini-batches (optimizer steps) per pass.")
    clip_eps: float = option(0.2, help="ε of the clipped surrogate.")
    clip_eps_high: float | None = option(None, help="Upper ε (DAPO clip-higher); null: = ε.")
    loss_aggregation: Aggregation = option(
        "seq_mean", help="seq_mean (GRPO paper) | token_mean (DAPO) | seq_sum."
    )
    learning_rate: float = option(1e-6, help="AdamW peak learning rate.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be ≥ 2, got {self.num_generations} (the group baseline "
                f"compares num_generations ≥ 2 completions of each prompt)"
            )
        for name in ("ppo_epochs", "num_mini_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0 < self.clip_eps < math.inf:
            raise ValueError(f"clip_eps must be a finite number > 0, got {self.clip_eps}")
        if self.clip_eps_high is not None and not 0 < self.clip_eps_high < math.inf:
            raise ValueError(
                f"clip_eps_high must be a finite number > 0 or null (= clip_eps), "
                f"got {self.clip_eps_high}"
            )
        n = self.rollout_size
        if n % self.num_mini_batches or (n // self.num_mini_batches) % (
            self.gradient_accumulation_steps
        ):
            raise ValueError(
                f"the rollout of {n} sequences must split into num_mini_batches="
                f"{self.num_mini_batches} × gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps} equal parts"
            )

    @property
    def algorithm(self) -> str:
        return "grpo"

    @property
    def needs_behaviour_forward(self) -> bool:
        """One update per rollout (μ = 1, one mini-batch) with no KL in the reward: the first
        training forward is at θ_old and gives the behaviour log-probs, so the rollout's extra
        forward is skipped (as TRL does for num_iterations = 1)."""
        return not (self.ppo_epochs == 1 and self.num_mini_batches == 1 and self.kl_in != "reward")


@dataclass
class RLOOConfig(GRPOConfig):
    """RLOO: leave-one-out baseline, KL to the reference in the sequence reward."""

    num_generations: int = option(4, help="G: completions per prompt (the group).")
    kl_in: KLPlacement = option("reward", help="Where the reference KL goes: reward, loss, none.")
    kl_estimator: Estimator = option("k1", help="KL estimator (kl_in=loss: k1 or k3).")
    kl_coef: float = option(0.05, help="β (initial β of an adaptive/PID controller).")
    loss_aggregation: Aggregation = option("token_mean", help="token_mean | seq_mean | seq_sum.")

    @property
    def algorithm(self) -> str:
        return "rloo"
