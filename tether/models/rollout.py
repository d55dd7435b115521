"""A half-precision copy of the policy's weights for sampling (the rollout engine's weights).

Why. Decoding is memory-bound: each new token reads every weight once. Sampling from an fp32
model under bf16 autocast reads the fp32 weights and writes a bf16 cast of each of them at
*every* decode step when autocast's weight-cast cache is off — and it must be off for selective
activation checkpointing's replay (see :mod:`tether.models.checkpointing`). A bf16 copy of the
weights, refreshed once per rollout, reads half the bytes per step and casts nothing. This is
what vLLM/SGLang-backed trainers (OpenRLHF, veRL) do with a separate inference engine; here the
"engine" is the same HF model class with half-precision parameters, sharing nothing with the
training graph.

Correctness. The copy only *samples*. Behaviour log-probs (the PPO ratio's denominator) come from
the training forward (:func:`tether.models.generation.generate` with ``compute_logprobs``, or the
first training forward at θ_old), so the sampler's bf16 rounding changes which tokens are drawn,
never the probabilities the loss uses — the same contract as any RLHF framework that samples with
an inference engine. Buffers (e.g. rotary ``inv_freq``) stay in their training dtype; tied
parameters stay tied (one copy). Memory: 2 bytes per parameter.

The rollout-engine seam. Everything a trainer needs from whatever samples its rollouts passes
through :func:`tether.models.generation.generate` (called by :func:`tether.train.rl.collect`, online
DPO and the held-out evaluator), and the contract is small:

1. **Weights in.** Before each rollout the engine is brought to the trainer's current θ
   (:meth:`RolloutWeights.sync` here: an in-place copy; for an external engine such as vLLM,
   colocated on the same GPUs, a ``load_weights`` of the gathered full state dict, once per
   iteration, then its KV cache reset; under FSDP/ZeRO-3 the gather is a collective on every
   process).
2. **Tokens out.** For B prompts (token ids, no padding) and a :class:`SamplingConfig`, return the
   response token ids (B, R), the mask up to and including the first EOS, and whether each ended
   with EOS: :class:`tether.models.generation.Rollout` without ``logprobs``.
3. **The sampler's log-probs.** The log-prob the engine gave each drawn token *after* its own
   temperature/top-k/top-p (``Rollout.sampler_logprobs``; vLLM: ``SamplingParams(logprobs=0)``).
   The behaviour log-probs of the loss always come from tether's training forward, so an engine
   can never bias the loss's π_old; ``kl/sampler_trainer`` measures the engine/trainer mismatch and
   ``tis_cap`` corrects it by truncated importance sampling.
4. **Per-sample seeds.** ``row_seeds`` (one per prompt,
   :func:`tether.models.generation.sample_seeds`) make a sample independent of the batch and the
   process; an engine that cannot honour them (vLLM's per-request ``seed`` can) loses only the
   N-process = 1-process equality, not correctness.

A vLLM engine is therefore a class with ``sync(model)`` and ``generate(prompt_ids, sampling,
row_seeds) -> Rollout`` that :func:`rollout_weights` returns instead of :class:`RolloutWeights`
(``rollout_engine: hf | vllm``). It is not implemented: it needs CUDA, and no GPU was available
to build and measure it against HF generate.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tether.configs.literals import ROLLOUT_DTYPE_HELP as ROLLOUT_DTYPE_HELP  # re-exported
from tether.configs.literals import RolloutDtype as RolloutDtype  # re-exported
from tether.models.logprobs import unwrap_model

SHARDED = ("DistributedType.FSDP", "DistributedType.DEEPSPEED", "FSDP", "DEEPSPEED")
"""accelerate distributed types whose parameters are sharded (``str(acc.distributed_type)``)."""


def _base_model(model: Any) -> nn.Module:
    m = model.module if hasattr(model, "module") else model
    return unwrap_model(m)


def is_peft_model(model: Any) -> bool:
    base = model.module if hasattr(model, "module") else model
    return hasattr(base, "peft_config")


class RolloutWeights:
    """A ``dtype`` copy of ``model`` for sampling; :meth:`sync` refreshes it from the live weights.

    Args:
        model: the training model (an HF causal LM; DDP/accelerate wrappers are unwrapped). PEFT
            models are not supported (use the training model to sample; :func:`rollout_weights`
            decides).
        dtype: the copy's parameter dtype (``torch.bfloat16`` or ``torch.float16``).
    """

    def __init__(self, model: Any, dtype: torch.dtype) -> None:
        if is_peft_model(model):
            raise ValueError("RolloutWeights does not copy PEFT models; sample with the model")
        base = _base_model(model)
        # Pre-seed deepcopy's memo with half-precision parameters, so the fp32 weights are never
        # duplicated (no transient full-precision copy); tied parameters map to one copy.
        memo: dict[int, Any] = {}
        for p in base.parameters():
            if id(p) not in memo:
                # requires_grad stays True: it is never in an optimizer and only runs under
                # no_grad, and on CPU (torch 2.13, oneDNN) bf16 decoding measured 25 % slower
                # with requires_grad=False weights.
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        self.model = copy.deepcopy(base, memo)
        self.model.eval()
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        if disable is None:  # transformers < 5
            disable = getattr(self.model, "gradient_checkpointing_disable", None)
        if disable is not None and getattr(self.model, "supports_gradient_checkpointing", False):
            disable()
        self.model.config.use_cache = True
        self.dtype = dtype
        src = dict(base.named_parameters())
        dst = dict(self.model.named_parameters())
        if src.keys() != dst.keys():
            raise RuntimeError("rollout copy's parameters do not match the model's")
        self._pairs = [(src[name], dst[name]) for name in src]

    @torch.no_grad()
    def sync(self) -> None:
        """Copy the live weights into the rollout copy (rounding to its dtype)."""
        for s, d in self._pairs:
            d.copy_(s)


def params_sharded(accelerator: Any, model: Any) -> bool:
    """Whether the run's parameters are sharded across processes (accelerate's FSDP/DeepSpeed,
    or tether's ``sharding=fsdp2``): every forward is then a collective."""
    from tether.models.sharding import is_sharded

    if accelerator is not None and str(accelerator.distributed_type) in SHARDED:
        return True
    return is_sharded(model)


def rollout_weights(
    model: Any, setting: str, precision: str, sharded: bool = False
) -> RolloutWeights | None:
    """The rollout copy a run asks for, or None to sample with the training model.

    Args:
        model: the training model.
        setting: ``auto`` (a copy in the autocast dtype when mixed precision is bf16/fp16 and the
            model is not PEFT), ``train`` (never copy), ``bf16``/``fp16`` (always copy).
        precision: the run's resolved mixed precision (``no`` | ``bf16`` | ``fp16``).
        sharded: the parameters are sharded across processes (FSDP, DeepSpeed ZeRO-3): a copy
            would hold one shard, so ``auto`` samples with the model and an explicit dtype is an
            error.
    """
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if setting == "train":
        return None
    if setting == "auto":
        if precision not in dtypes or is_peft_model(model) or sharded:
            return None
        return RolloutWeights(model, dtypes[precision])
    if setting not in dtypes:
        raise ValueError(f"rollout_dtype must be auto, train, bf16 or fp16, got {setting!r}")
    if sharded:
        raise ValueError(
            f"rollout_dtype={setting} copies the weights, which sharded (FSDP/DeepSpeed) "
            "parameters do not allow; use rollout_dtype=auto or train"
        )
    if is_peft_model(model):
        raise ValueError(
            f"rollout_dtype={setting} copies the weights, which PEFT models do not support; "
            "use rollout_dtype=auto or train"
        )
    return RolloutWeights(model, dtypes[setting])
