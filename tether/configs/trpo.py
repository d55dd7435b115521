"""The config of TRPO for LMs (``tether train trpo``), trained by :func:`tether.train.trpo.train`
(which re-exports it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from tether.configs.rl import RLConfig
from tether.runs.config import option


@dataclass
class TRPOConfig(RLConfig):
    """TRPO: natural-gradient steps inside a KL(π_old‖π_θ) ≤ δ trust region."""

    max_kl: float = option(0.01, help="δ: mean per-token KL(π_old‖π_new) allowed per update.")
    cg_iters: int = option(10, help="Conjugate-gradient iterations.")
    cg_damping: float = option(0.1, help="Damping added to the Fisher matrix.")
    backtrack_ratio: float = option(0.8, help="Step shrink factor per line-search try.")
    max_backtracks: int = option(10, help="Line-search tries before the update is rejected.")
    advantage: Literal["gae", "rloo", "grpo"] = option(
        "gae", help="gae (value head on detached features) | rloo | grpo (need G ≥ 2)."
    )
    gamma: float = option(1.0, help="Discount over tokens (gae).")
    lam: float = option(0.95, help="GAE λ.")
    whiten_advantages: bool = option(True, help="Whiten advantages over the response tokens.")
    vf_iters: int = option(5, help="Value-head regression passes per iteration (gae).")
    learning_rate: float = option(
        1e-3, help="AdamW LR of the value head (the policy moves by the natural-gradient step)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sharding == "fsdp2":
            raise ValueError(
                "sharding must be none for trpo, got sharding=fsdp2: its natural-gradient step "
                "differentiates the KL twice with torch.autograd.grad with respect to the "
                "parameters (Fisher-vector products), which FSDP2's sharded parameters cannot "
                "take part in; use DDP (every process holds the whole model), or ppo/grpo"
            )
        if self.kl_in == "loss":
            raise ValueError(
                "TRPO keeps the reference KL in the reward (kl_in=reward) or drops it (none); "
                "its update has no loss to add a KL term to"
            )
        if not 0 < self.max_kl < math.inf:
            raise ValueError(f"max_kl must be a finite number > 0, got {self.max_kl}")
        if not 0 <= self.cg_damping < math.inf:
            raise ValueError(f"cg_damping must be a finite number ≥ 0, got {self.cg_damping}")
        if not 0 < self.backtrack_ratio < 1:
            raise ValueError(f"backtrack_ratio must be in (0, 1), got {self.backtrack_ratio}")
        for name in ("cg_iters", "max_backtracks", "vf_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.advantage != "gae" and self.num_generations < 2:
            raise ValueError(
                f"num_generations must be ≥ 2 with advantage={self.advantage} (a group "
                f"baseline), got {self.num_generations}"
            )

    @property
    def algorithm(self) -> str:
        return "trpo"
