"""The numerics of a log-ratio: which precision the two sides of log π_θ − log π_ref run in.

Why it matters. Under bf16 autocast every forward carries rounding noise of order 0.01–0.1 nats
per token in its log-probs. Two forwards of the *same* weights with the same kernels round the
same way, so the noise cancels in their difference; but as soon as the weights differ (one small
update of π_θ away from π_ref) the roundings decorrelate and the log-ratio carries independent
noise ε of that size. A sampled estimator then reports noise as KL: E[k3] ≈ KL + ½·E[ε²] per
token (k3 ≈ ½(log r)² near r = 1), so a policy 3e-4 nats from its reference was measured at
0.16 nats per response (tether issue 11; the "training–inference mismatch" of TRL/veRL/NeMo-RL is
the same effect between a sampler and a trainer).

The remedy is to compute both sides of every log-ratio that a user or a controller reads in
fp32: ``kl_precision="fp32"`` (the default). fp32's rounding (≈1e-7 relative) leaves a noise floor
of ≈1e-10 nats per token. On CUDA, "fp32" must mean fp32: TF32 matmuls (10-bit mantissa) are
switched off inside :func:`fp32_numerics`. ``kl_precision="train"`` computes them in the training
precision (cheaper; the noise floor is then logged so the user sees it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from tether.configs.literals import KL_PRECISION_HELP as KL_PRECISION_HELP  # re-exported
from tether.configs.literals import KLPrecision
from tether.models.logprobs import forward_logprobs, unwrap_model

HALF_PRECISIONS = ("bf16", "fp16")


@contextlib.contextmanager
def fp32_numerics(device_type: str = "cpu") -> Iterator[None]:
    """Autocast off and full-precision fp32 matmuls (no TF32) inside the block; restored after.

    Weights and activations of an fp32 model then stay fp32 end to end. A model whose weights are
    half precision still runs in half precision here (autocast cannot upcast): callers check
    :func:`weights_are_fp32` first.
    """
    prev_matmul = torch.get_float32_matmul_precision()
    prev_cudnn = torch.backends.cudnn.allow_tf32
    with torch.autocast(device_type, enabled=False):
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(prev_matmul)
            torch.backends.cudnn.allow_tf32 = prev_cudnn


def kl_numerics(
    precision: KLPrecision, autocast: Callable[[], Any], device_type: str = "cpu"
) -> contextlib.AbstractContextManager[Any]:
    """The context the log-probs of a KL are computed in: :func:`fp32_numerics` for ``fp32``,
    the training autocast (``autocast()``, e.g. ``accelerator.autocast``) for ``train``."""
    if precision == "fp32":
        return fp32_numerics(device_type)
    if precision == "train":
        return autocast()
    raise ValueError(f"kl_precision must be fp32 or train, got {precision!r}")


def separate_kl_forward(
    kl_precision: KLPrecision, mixed_precision: str, device_type: str = "cpu"
) -> bool:
    """Whether the policy side of the KL needs its own forward: the KL is wanted in fp32 but the
    training forward (which gives the behaviour log-probs of the PPO ratio) runs in half
    precision, or (CUDA) with TF32 matmuls. Under ``mixed_precision="no"`` with full-precision
    matmuls the training forward already is fp32."""
    if kl_precision != "fp32":
        return False
    if mixed_precision in HALF_PRECISIONS:
        return True
    return device_type == "cuda" and torch.get_float32_matmul_precision() != "highest"


def weights_are_fp32(model: torch.nn.Module) -> bool:
    """Whether every floating-point parameter of ``model`` is fp32 (or fp64)."""
    return all(
        p.dtype in (torch.float32, torch.float64)
        for p in model.parameters()
        if p.dtype.is_floating_point
    )


def check_fp32_weights(model: torch.nn.Module, what: str) -> None:
    """Raise a clear error when ``kl_precision=fp32`` is asked of half-precision weights."""
    if not weights_are_fp32(model):
        dtypes = sorted({str(p.dtype) for p in model.parameters() if p.dtype.is_floating_point})
        raise ValueError(
            f"kl_precision=fp32 needs fp32 weights, but the {what} has {', '.join(dtypes)} "
            "parameters: load it with dtype=float32 (and train under mixed_precision=bf16), or "
            "set kl_precision=train"
        )


@torch.no_grad()
def fp32_policy_logprobs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, mask: Tensor, temperature: float
) -> Tensor:
    """(B, T−1) log-probs of ``model`` at its current weights in :func:`fp32_numerics` (eval
    mode, no grad), in :func:`tether.models.logprobs.forward_logprobs`' layout: the policy side of
    a KL when the training forward runs in half precision. Pass the bare model, not one prepared
    by accelerate under mixed precision (its patched forward re-enters autocast)."""
    base = unwrap_model(model)
    was = base.training
    base.eval()
    try:
        with fp32_numerics(input_ids.device.type):
            out = forward_logprobs(
                model, input_ids, attention_mask, mask=mask, temperature=temperature
            )
    finally:
        base.train(was)
    return out.logprobs.float()
