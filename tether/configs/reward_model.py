"""The config of Bradley–Terry reward-model training (``tether train reward``), trained by
:func:`tether.train.reward_model.train` (which re-exports it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tether.configs.common import PreferenceDataConfig
from tether.runs.config import option


@dataclass
class RewardConfig(PreferenceDataConfig):
    """Bradley–Terry reward-model training."""

    margin: float | None = option(
        None, help="Margin m in −log σ(r_w − r_l − m) (Llama 2); null: no margin."
    )
    center_rewards_coefficient: float | None = option(
        None, help="Weight of mean((r_w + r_l)²), pulling rewards towards 0 (TRL); null: off."
    )
    normalization_samples: int = option(
        1024, help="Training pairs scored at the end for the saved reward mean/std (0: skip)."
    )
    learning_rate: float = option(1e-5, help="AdamW peak learning rate.")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("margin", "center_rewards_coefficient"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number ≥ 0 or null (off), got {value}")
        if self.normalization_samples < 0:
            raise ValueError(f"normalization_samples must be ≥ 0, got {self.normalization_samples}")
