"""The Literal option types and help strings that configs share with the code they configure.

They live here, not next to that code, because ``tether.core``, ``tether.models`` and
``tether.eval`` import torch when imported; the modules that implement an option import its type
from here (``tether.core.kl.Estimator`` is this module's ``Estimator``), so the names are defined
once. Nothing here imports torch, transformers, accelerate or datasets.
"""

from __future__ import annotations

from typing import Literal

Aggregation = Literal["token_mean", "seq_mean", "seq_sum"]
"""How a per-token loss becomes a scalar (:func:`tether.core.masked.aggregate`)."""

Estimator = Literal["k1", "k2", "k3", "abs"]
"""Per-token KL estimators (:mod:`tether.core.kl`)."""

DPOLossType = Literal["sigmoid", "cdpo", "ipo", "robust", "hinge", "chi2po"]
"""The DPO-family losses of :func:`tether.core.losses.dpo_loss`."""

CheckpointMode = Literal["selective", "full", "none"]
"""Activation checkpointing modes (:mod:`tether.models.checkpointing`)."""

KLPrecision = Literal["fp32", "train"]
"""Numerics of the KL's log-ratio (:mod:`tether.models.numerics`)."""
KL_PRECISION_HELP = (
    "Numerics of the KL's log-ratio (policy vs reference log-probs): fp32 (autocast off, no TF32; "
    "costs an fp32 policy forward per rollout under mixed precision) or train (the training "
    "precision: cheaper, but bf16 rounding noise then reads as KL)."
)

RolloutDtype = Literal["auto", "train", "bf16", "fp16"]
"""The weights rollouts sample from (:mod:`tether.models.rollout`)."""
ROLLOUT_DTYPE_HELP = (
    "Sample from a bf16/fp16 copy of the weights refreshed every rollout (auto: when mixed "
    "precision is bf16/fp16 and no LoRA), or from the training model (train)."
)

Combine = Literal["mean", "worst", "uwo"]
"""How a reward ensemble combines its members (:mod:`tether.rewards.ensemble`)."""
