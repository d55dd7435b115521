"""Activation checkpointing of decoder layers: ``selective`` (the default), ``full``, ``none``.

``full`` is the classic trade: keep only each layer's input, recompute the whole layer in backward
(≈ one more forward, +25–35 % step time). ``selective`` uses PyTorch's selective activation
checkpointing (SAC, ``torch.utils.checkpoint.create_selective_checkpoint_contexts``): the outputs
of the expensive ops (matmuls and fused attention) are saved, everything else (RMSNorm, RoPE,
SiLU, residual adds, dtype casts) is recomputed from them in backward. The elementwise ops are a
few percent of the FLOPs but their saved inputs are most of a Llama layer's activation memory
(the four 3·H-wide MLP intermediates, the fp32 norm statistics), so SAC keeps most of the memory
saving of ``full`` at almost none of its time (measured in ``benchmarks/dpo_vs_trl.py``).

Under autocast, the recompute must see the same casts as the forward, so autocast's weight-cast
cache has to be off (``torch.autocast(..., cache_enabled=False)``); :func:`autocast_kwargs` says
so for a mode, and :func:`tether.train.common.make_accelerator` applies it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from tether.configs.literals import CheckpointMode

CHECKPOINT_MODES = ("selective", "full", "none")


def _saved_ops() -> frozenset[Any]:
    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_flash_attention_forward",
        "_efficient_attention_forward",
    )
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


SAVED_OPS = _saved_ops()


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context() -> Any:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint``: save matmul/attention outputs."""
    return create_selective_checkpoint_contexts(_policy)


def enable_activation_checkpointing(model: Any, mode: CheckpointMode) -> None:
    """Turn on ``mode`` for an HF model's decoder layers (PEFT-wrapped models too)."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(
            f"activation_checkpointing must be one of {CHECKPOINT_MODES}, got {mode!r}"
        )
    if mode == "none":
        return
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_context
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers ≥ 5
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def autocast_kwargs(mode: CheckpointMode) -> dict[str, Any]:
    """Extra ``torch.autocast`` arguments a checkpointing mode needs (see the module docstring)."""
    return {"cache_enabled": False} if mode == "selective" else {}
