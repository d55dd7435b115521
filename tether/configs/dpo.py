"""The config of offline DPO-family training (``tether train dpo``): :class:`DPOConfig`, trained
by :func:`tether.train.dpo.train` (which re-exports it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from tether.configs.checks import check_sharded_reference
from tether.configs.common import PreferenceDataConfig
from tether.configs.eval import EvalConfig
from tether.configs.literals import DPOLossType
from tether.runs.config import option


@dataclass
class DPOConfig(EvalConfig, PreferenceDataConfig):
    """Offline DPO-family training; at each evaluation also held-out sampling
    (:class:`tether.eval.heldout.EvalConfig`; eval prompts default to the held-out pairs')."""

    reward: str | None = option(
        None,
        help="The reward the preference labels came from (the proxy), measured on held-out "
        "samples as eval/proxy (null: none); eval_rewards are the gold ones.",
    )
    max_new_tokens: int = option(64, help="Response length cap of held-out samples.")
    temperature: float = option(1.0, help="Sampling temperature of held-out samples.")
    beta: float = option(0.1, help="β: KL coefficient of the implicit objective (τ for IPO).")
    loss_type: DPOLossType = option(
        "sigmoid", help="sigmoid | cdpo | ipo | robust | hinge | chi2po."
    )
    label_smoothing: float = option(0.0, help="ε: assumed label-flip rate (cdpo, robust).")
    chi2_max_reward: float = option(1.0, help="χPO R_max: reward differences clipped to ±2·R_max.")
    logps: Literal["auto", "sum", "mean"] = option(
        "auto", help="Sequence log-prob: sum over tokens, or mean (auto: mean for ipo, else sum)."
    )
    reference: Literal["auto", "copy", "adapter", "precomputed", "synced"] = option(
        "auto",
        help="Reference policy kind. auto: precomputed (once, cached) when training in fp32; a "
        "live reference on each training batch (adapter with LoRA, else copy) under bf16/fp16, "
        "whose rounding then matches the policy's (at step 0 the loss is exactly log 2).",
    )
    ref_dtype: Literal["same", "bfloat16"] = option("same", help="Dtype of a 'copy' reference.")
    sync_alpha: float = option(0.6, help="TR-DPO mixing weight α of the 'synced' reference.")
    sync_tau: int = option(512, help="TR-DPO: sync the reference every τ steps.")
    exact_kl_samples: int = option(
        2, help="Chosen responses per logging step on which the exact KL is computed (0: off)."
    )
    learning_rate: float = option(1e-6, help="AdamW peak learning rate.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sharded_reference(self.sharding, self.reference)
        if not 0 < self.beta < math.inf:
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not 0 < self.chi2_max_reward < math.inf:
            raise ValueError(
                f"chi2_max_reward must be a finite number > 0, got {self.chi2_max_reward}"
            )
        if not 0 <= self.sync_alpha <= 1:
            raise ValueError(f"sync_alpha must be in [0, 1], got {self.sync_alpha}")
        if self.sync_tau < 1:
            raise ValueError(f"sync_tau must be ≥ 1, got {self.sync_tau}")
        if self.exact_kl_samples < 0:
            raise ValueError(f"exact_kl_samples must be ≥ 0, got {self.exact_kl_samples}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        self.check_eval()

    @property
    def reference_kind(self) -> str:
        """The reference kind ``auto`` resolves to. Under half-precision autocast a forward's
        rounding depends on the batch it runs in (padding, packing, kernel shapes), so log-probs
        cached from other batches differ from the training forward's by ≈0.01–0.1 nats per
        token even where π_θ = π_ref (the bf16 step-0 DPO loss was 0.7011 instead of log 2). A
        live reference computed on the training batch under the same autocast rounds as the
        policy does; in fp32 the cached log-probs agree to ≈1e-6 and precomputing is free."""
        if self.reference != "auto":
            return self.reference
        from tether.models.numerics import HALF_PRECISIONS  # torch: only when training
        from tether.train.common import resolve_mixed_precision

        if resolve_mixed_precision(self.mixed_precision) in HALF_PRECISIONS:
            return "adapter" if self.peft else "copy"
        return "precomputed"

    @property
    def mean_logps(self) -> bool:
        return self.logps == "mean" or (self.logps == "auto" and self.loss_type == "ipo")
