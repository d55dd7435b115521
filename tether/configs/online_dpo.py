"""The config of online DPO (``tether train online_dpo``), trained by
:func:`tether.train.online_dpo.train` (which re-exports it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from tether.configs.checks import check_horizon, check_sharded_reference
from tether.configs.common import SamplingTrainConfig
from tether.configs.literals import DPOLossType
from tether.runs.config import option


@dataclass
class OnlineDPOConfig(SamplingTrainConfig):
    """Online DPO: sample pairs from the policy, judge them, update."""

    judge: str = option(
        "vader", help="Reward: built-in name, reward-model dir, or module:function."
    )
    beta: float = option(0.1, help="β (initial β for linear/adaptive schedules).")
    beta_schedule: Literal["constant", "linear", "adaptive"] = option(
        "constant", help="How β changes: constant, linear to beta_end, or adaptive to kl_target."
    )
    beta_end: float = option(0.1, help="Final β of the linear schedule.")
    kl_target: float = option(4.0, help="On-policy KL (nats per sequence) the adaptive β holds.")
    kl_horizon: float = option(2000.0, help="AdaptiveKL horizon, in samples.")
    loss_type: DPOLossType = option(
        "sigmoid", help="sigmoid | cdpo | ipo | robust | hinge | chi2po."
    )
    label_smoothing: float = option(0.0, help="ε: assumed label-flip rate (cdpo, robust).")
    reference: Literal["copy", "adapter", "synced"] = option(
        "copy", help="Reference kind (adapter needs LoRA)."
    )
    min_score_gap: float = option(0.0, help="Skip pairs whose judge scores differ by ≤ this.")
    learning_rate: float = option(5e-7, help="AdamW peak learning rate.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sharded_reference(self.sharding, self.reference)
        for name in ("beta", "beta_end", "kl_target", "kl_horizon"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not 0 <= self.min_score_gap < math.inf:
            raise ValueError(f"min_score_gap must be a finite number ≥ 0, got {self.min_score_gap}")
        if self.beta_schedule == "adaptive":
            # Two samples per prompt; n_steps is global (× processes): AdaptiveKL.update checks
            # that at the first step.
            check_horizon(
                self.kl_horizon,
                2 * self.batch_size,
                name="kl_horizon",
                steps="2·batch_size",
                note="the samples per update of one process; N processes need N times more",
            )
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                "online_dpo samples a fresh batch per step: use batch_size, not "
                "gradient_accumulation_steps"
            )
