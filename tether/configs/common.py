"""Config fields shared by the LM trainers: model and optimisation (:class:`TrainConfig`),
sampling trainers (:class:`SamplingTrainConfig`) and preference-data trainers
(:class:`PreferenceDataConfig`). :mod:`tether.train.common` re-exports them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from tether.configs.eval import EvalConfig
from tether.configs.literals import (
    KL_PRECISION_HELP,
    ROLLOUT_DTYPE_HELP,
    CheckpointMode,
    KLPrecision,
    RolloutDtype,
)
from tether.runs.config import RunConfig, option


@dataclass
class TrainConfig(RunConfig):
    """Model and optimisation fields shared by the LM trainers (flat, so ``key=value`` is easy)."""

    model: str = option("smollm2-135m-instruct", help="Policy: embedded name, local path or HF id.")
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "float32", help="Weights dtype of the trained model (auto: bf16 on a bf16 GPU)."
    )
    peft: dict[str, Any] | None = option(
        None, help="LoRA settings (peft.LoraConfig fields), e.g. {r: 16}; null = full fine-tune."
    )
    activation_checkpointing: CheckpointMode = option(
        "selective",
        help="selective: save matmul/attention outputs, recompute the elementwise ops (most of "
        "the memory saving, almost no time); full: recompute whole layers; none.",
    )
    learning_rate: float = option(1e-6, help="AdamW peak learning rate.")
    weight_decay: float = option(0.0, help="AdamW decoupled weight decay (not on norms/biases).")
    adam_betas: list[float] = option([0.9, 0.999], help="AdamW (beta1, beta2).")
    max_grad_norm: float | None = option(1.0, help="Clip the global gradient norm (null: off).")
    lr_scheduler: Literal["constant", "linear", "cosine"] = option(
        "linear", help="LR schedule after warmup."
    )
    warmup_steps: int = option(0, help="Linear LR warmup, in optimizer steps.")
    batch_size: int = option(8, help="Examples per optimizer step per process (before accum.).")
    gradient_accumulation_steps: int = option(
        1, help="Micro-batches per optimizer step; batch_size is split into this many."
    )
    sharding: Literal["none", "fsdp2"] = option(
        "none",
        help="none: every process holds the whole model (DDP); fsdp2: parameters, gradients and "
        "optimizer state sharded over processes (torch fully_shard per decoder block and at the "
        "root), checkpoints sharded (torch.distributed.checkpoint), final/ one plain HF model.",
    )
    max_bad_steps: int = option(
        10,
        help="A step with a non-finite loss, gradient norm, reward or KL is skipped (counted "
        "as bad_steps); this many in a row stop the run, its last good checkpoint kept.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("model must be an embedded name, a local path or an HF id, got ''")
        if not 0 < self.learning_rate < math.inf:
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number ≥ 0, got {self.weight_decay}")
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers, got {self.adam_betas}")
        for i, b in enumerate(self.adam_betas):
            if not 0 <= b < 1:
                raise ValueError(f"adam_betas[{i}] must be in [0, 1), got {b}")
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            # A negative max_norm makes the clip coefficient negative: gradient ascent.
            raise ValueError(
                f"max_grad_norm must be a finite number > 0 or null (off), got {self.max_grad_norm}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be ≥ 1, got {self.max_bad_steps}")
        for name in ("batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.sharding not in ("none", "fsdp2"):
            raise ValueError(f"sharding must be none or fsdp2, got {self.sharding!r}")
        if self.batch_size % self.gradient_accumulation_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps})"
            )

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.gradient_accumulation_steps


@dataclass
class SamplingTrainConfig(EvalConfig, TrainConfig):
    """Fields of the trainers that sample from the policy (the RL trainers, online DPO), and
    their held-out evaluation (:class:`tether.eval.heldout.EvalConfig`)."""

    prompts: str = option(
        "",
        help="Prompts (a 'prompt' column): a JSONL/JSON/CSV/Parquet file, a HF dataset dir or a "
        "cached hub id org/name; SOURCE:SPLIT picks a split.",
    )
    as_chat: bool = option(False, help="Wrap plain-string prompts as a user message.")
    max_prompt_length: int = option(256, help="Max prompt tokens; a longer prompt is an error.")
    max_new_tokens: int = option(48, help="Response length cap R.")
    temperature: float = option(1.0, help="Sampling temperature (the policy is π_θ at it).")
    top_k: int = option(0, help="Top-k sampling (0: off).")
    top_p: float = option(1.0, help="Nucleus sampling mass (1: off).")
    rollout_dtype: RolloutDtype = option("auto", help=ROLLOUT_DTYPE_HELP)
    kl_precision: KLPrecision = option("fp32", help=KL_PRECISION_HELP)
    eval_steps: int = option(
        25,
        help="Held-out evaluation (eval/ metrics, samples/) at step 0 and every N steps (0: off).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_eval()
        for name in ("max_prompt_length", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")
        if self.sharding == "fsdp2" and self.rollout_dtype in ("bf16", "fp16"):
            raise ValueError(
                "rollout_dtype must be auto or train under sharding=fsdp2, got "
                f"rollout_dtype={self.rollout_dtype}: it samples from a whole copy of the "
                "weights, which no process holds when they are sharded (auto and train sample "
                "from the sharded policy)"
            )
        if self.kl_precision == "fp32" and self.dtype == "bfloat16":
            raise ValueError(
                "kl_precision=fp32 needs fp32 weights, but dtype=bfloat16: use dtype=float32 "
                "(train under mixed_precision=bf16) or kl_precision=train"
            )


@dataclass
class PreferenceDataConfig(TrainConfig):
    """Fields of the trainers that read preference pairs (DPO, reward models)."""

    train_data: str = option(
        "",
        help="Preference pairs (prompt/chosen/rejected): a JSONL/JSON/CSV/Parquet file, a HF "
        "dataset dir or a cached hub id org/name; SOURCE:SPLIT picks a split.",
    )
    eval_data: str | None = option(
        None, help="Held-out preference data (default: a split of train_data)."
    )
    eval_fraction: float = option(0.1, help="Fraction of train held out when eval_data is null.")
    eval_steps: int = option(
        50, help="Evaluate held-out loss/accuracy every N steps (and at the end)."
    )
    max_length: int = option(512, help="Max prompt+response tokens; longer responses are cut.")
    max_prompt_length: int = option(256, help="Max prompt tokens; a longer prompt is an error.")
    as_chat: bool = option(
        False, help="Wrap plain-string prompts/responses as chat messages (chat template)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_steps < 1:
            raise ValueError(f"eval_steps must be ≥ 1, got {self.eval_steps}")
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be ≥ 1, got {self.max_prompt_length}")
        if self.max_length <= self.max_prompt_length:
            raise ValueError(
                f"max_length must be > max_prompt_length ({self.max_prompt_length}): room for a "
                f"response, got {self.max_length}"
            )
