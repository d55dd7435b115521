"""Per-token log-probabilities of given tokens, without a full fp32 (B, T, V) log-softmax.

The backbone runs once; the LM head and the fp32 log-softmax then run ``chunk_size`` positions at a
time. In training each chunk is wrapped in activation checkpointing, so its (chunk, V) logits are
recomputed in backward instead of being kept: the memory for the head is O(chunk·V) instead of
O(B·T·V) (the idea of fused linear-cross-entropy kernels, in plain PyTorch). Positions that no loss
reads (prompt tokens, padding) can be skipped entirely with ``mask``.

Alignment: for ``input_ids`` (B, T), outputs are (B, T−1) and position t holds
log π(x_{t+1} | x_≤t), i.e. the log-prob of token ``input_ids[:, t+1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tether.models.packing import packed_hidden, packing_supported, plan_packing

DEFAULT_CHUNK = 1024  # positions per head chunk; (1024, 49152) fp32 logits = 192 MiB


@dataclass
class LogProbOutput:
    """What :func:`forward_logprobs` returns. Shapes for ``input_ids`` (B, T)."""

    logprobs: Tensor
    """(B, T−1) float32: log π(x_{t+1} | x_≤t); 0 where ``mask`` is False."""
    entropy: Tensor | None = None
    """(B, T−1) float32 entropy of π(· | x_≤t), if asked for; 0 where ``mask`` is False."""
    logits: Tensor | None = None
    """(B, T−1, V) logits in the model's dtype (divided by the temperature), if asked for."""
    hidden: Tensor | None = None
    """(B, T, H) last hidden states, if asked for (for value heads)."""


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that ignore left padding: (B, T) → (B, T), 0 at the first real token.

    This is what HF ``generate`` uses for left-padded prompts, so the training forward of a
    rollout sees the same positions as the sampler did.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)


def unwrap_model(model: Any) -> Any:
    """The transformers ``PreTrainedModel`` inside a PEFT wrapper or accelerate/DDP wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module  # DDP / FSDP wrappers
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()  # PEFT (adapters stay injected in its layers)
    return model


def backbone_and_head(model: Any) -> tuple[nn.Module, nn.Module]:
    """Split a causal LM into its decoder backbone and its output embedding (LM head)."""
    base = unwrap_model(model)
    backbone = getattr(base, base.base_model_prefix, None)
    head = base.get_output_embeddings()
    if backbone is None or head is None:
        raise ValueError(
            f"{type(base).__name__} has no `{base.base_model_prefix}` backbone or no output "
            "embeddings; tether needs a standard HF *ForCausalLM model"
        )
    return backbone, head


def _final_logit_transform(model: Any) -> tuple[float | None, float]:
    """(softcap, scale) some architectures apply to logits after the head (Gemma 2, Cohere)."""
    cfg = unwrap_model(model).config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None) or 1.0
    return softcap, float(scale)


def _head_logits(
    head: nn.Module, h: Tensor, temperature: float, softcap: float | None, scale: float
) -> Tensor:
    logits = head(h)
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def _chunk_logprobs(
    h: Tensor,
    targets: Tensor,
    head: nn.Module,
    temperature: float,
    softcap: float | None,
    scale: float,
    with_entropy: bool,
) -> tuple[Tensor, Tensor]:
    """(N, H) hidden, (N,) targets → (N,) fp32 log-probs and (N,) entropies (zeros if not asked)."""
    logits = _head_logits(head, h, temperature, softcap, scale).float()  # (N, V) fp32
    lse = torch.logsumexp(logits, dim=-1)  # (N,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse  # (N,)
    if with_entropy:
        probs = torch.softmax(logits, dim=-1)
        entropy = lse - (probs * logits).sum(-1)  # H = logsumexp − E_p[logit]
    else:
        entropy = torch.zeros_like(logp)
    return logp, entropy


def _compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul dtype the head would run in: autocast's if active on this device, else h's."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


class _LinearLogProb(torch.autograd.Function):
    """log softmax(h Wᵀ / τ)[target] for a bias-free linear head, (N, V) logits never saved.

    Forward: logits = h Wᵀ in the matmul dtype, then fp32; the target logit is gathered and the
    log-sum-exp taken in place (max, subtract, exp, sum) on that one buffer. Only h, the targets
    and the (N,) log-sum-exp are saved. Backward recomputes the logits once and forms
    ∂logp/∂logits = (onehot(target) − softmax)/τ in place:
    ∂/∂h = G W, ∂/∂W = Gᵀ h. Against checkpointing the generic head this skips the recomputed
    log-sum-exp and several (N, V) temporaries.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, h: Tensor, weight: Tensor, targets: Tensor, inv_temp: float
    ) -> Tensor:
        cd = _compute_dtype(h, weight)
        with torch.autocast(h.device.type, enabled=False):
            logits = (h.to(cd) @ weight.to(cd).T).float()  # (N, V)
        if inv_temp != 1.0:
            logits.mul_(inv_temp)
        tgt = logits.gather(1, targets[:, None]).squeeze(1)  # (N,)
        peak = logits.amax(1, keepdim=True)  # (N, 1)
        lse = logits.sub_(peak).exp_().sum(1).log_() + peak.squeeze(1)  # (N,)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.inv_temp, ctx.cd = inv_temp, cd
        return tgt - lse

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        h, weight, targets, lse = ctx.saved_tensors
        cd, inv_temp = ctx.cd, ctx.inv_temp
        with torch.autocast(h.device.type, enabled=False):
            g = (h.to(cd) @ weight.to(cd).T).float()  # (N, V) logits again
            if inv_temp != 1.0:
                g.mul_(inv_temp)
            g.sub_(lse[:, None]).exp_().mul_(-grad[:, None])  # −grad · softmax
            g.scatter_add_(1, targets[:, None], grad[:, None])  # + grad · onehot
            if inv_temp != 1.0:
                g.mul_(inv_temp)
            g = g.to(cd)
            grad_h = (g @ weight.to(cd)).to(h.dtype) if ctx.needs_input_grad[0] else None
            grad_w = (g.T @ h.to(cd)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None


def _fusable_head(head: nn.Module, softcap: float | None, scale: float, entropy: bool) -> bool:
    """Whether :class:`_LinearLogProb` computes exactly what the generic head path would."""
    return (
        type(head) is nn.Linear
        and head.bias is None
        and softcap is None
        and scale == 1.0
        and not entropy
    )


LOGPROBS_METHOD = "tether_forward_logprobs"
"""The name under which an FSDP2-sharded root carries :func:`forward_logprobs_unsharded` as an
FSDP forward method (:func:`tether.models.sharding.shard_model`)."""


def forward_logprobs(model: Any, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Any:
    """Log-probs of ``input_ids[:, 1:]`` under ``model``: :func:`forward_logprobs_unsharded`,
    run through the model's FSDP2 forward method when its parameters are sharded
    (:func:`tether.models.sharding.shard_model`), so they are gathered around the computation
    as around ``forward``. Same arguments and result."""
    sharded_entry = getattr(unwrap_model(model), LOGPROBS_METHOD, None)
    if sharded_entry is not None:
        return sharded_entry(input_ids, attention_mask, _model=model, **kwargs)
    return forward_logprobs_unsharded(model, input_ids, attention_mask, **kwargs)


def forward_logprobs_unsharded(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_logits: bool = False,
    return_hidden: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    position_ids: Tensor | None = None,
    packing: bool | None = None,
) -> LogProbOutput:
    """Log-probs of ``input_ids[:, 1:]`` under ``model``, chunked over positions.

    Args:
        model: an HF causal LM (optionally PEFT- or DDP-wrapped).
        input_ids: (B, T) token ids.
        attention_mask: (B, T) bool/int, True on real tokens (left or right padding).
        mask: optional (B, T−1) bool: the positions whose log-probs are needed; the others are
            not computed (0 in the output). E.g. ``response_mask[:, 1:]``.
        temperature: logits are divided by it before the softmax (the sampling distribution).
        return_entropy: also return per-position entropies.
        return_logits: also return the (B, T−1, V) logits (for the exact KL). The log-probs
            are still computed chunk by chunk in fp32.
        return_hidden: also return the (B, T, H) last hidden states.
        chunk_size: positions per LM-head chunk.
        position_ids: (B, T); default derived from ``attention_mask`` (left-padding safe).
        packing: run the backbone padding-free (:mod:`tether.models.packing`): True/None pack
            when the batch has ≥10 % padding and the model passes :func:`packing_supported`;
            False never packs. Same result up to floating-point summation order.

    Returns:
        :class:`LogProbOutput` with float32 log-probs (B, T−1).
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be (B, T), got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, t = input_ids.shape
    if mask is not None and mask.shape != (b, t - 1):
        raise ValueError(f"mask must be (B, T−1) = {(b, t - 1)}, got {tuple(mask.shape)}")
    backbone, head = backbone_and_head(model)
    softcap, scale = _final_logit_transform(model)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    plan = None
    if packing is not False and packing_supported(backbone):
        plan = plan_packing(attention_mask, position_ids)
    if plan is not None:
        hidden = packed_hidden(backbone, input_ids, plan)  # (B, T, H), 0 on padding
    else:
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, T, H)
    h = hidden[:, :-1]  # (B, T−1, H): position t predicts token t+1
    targets = input_ids[:, 1:]  # (B, T−1)

    logits_out = None
    if return_logits:
        logits_out = _head_logits(head, h, temperature, softcap, scale)  # (B, T−1, V)

    flat_h = h.reshape(-1, h.shape[-1])  # (N, H)
    flat_t = targets.reshape(-1)  # (N,)
    rows = None
    if mask is not None:
        rows = mask.reshape(-1).nonzero().squeeze(-1)  # (M,) positions actually needed
        flat_h, flat_t = flat_h.index_select(0, rows), flat_t.index_select(0, rows)

    use_ckpt = torch.is_grad_enabled() and flat_h.requires_grad
    lps, ents = [], []
    if _fusable_head(head, softcap, scale, return_entropy):
        for s in range(0, flat_h.shape[0], chunk_size):
            lps.append(
                _LinearLogProb.apply(
                    flat_h[s : s + chunk_size],
                    head.weight,
                    flat_t[s : s + chunk_size],
                    1.0 / temperature,
                )
            )
            ents.append(torch.zeros_like(lps[-1]))
    for s in range(0, flat_h.shape[0] if not lps else 0, chunk_size):
        args = (
            flat_h[s : s + chunk_size],
            flat_t[s : s + chunk_size],
            head,
            temperature,
            softcap,
            scale,
            return_entropy,
        )
        if use_ckpt:
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    empty = flat_h.new_zeros(0, dtype=torch.float32)
    logp = torch.cat(lps) if lps else empty
    entropy = torch.cat(ents) if ents else empty
    if rows is not None:
        logp = torch.zeros(b * (t - 1), dtype=torch.float32, device=logp.device).index_put(
            (rows,), logp
        )
        entropy = torch.zeros(b * (t - 1), dtype=torch.float32, device=logp.device).index_put(
            (rows,), entropy
        )
    return LogProbOutput(
        logprobs=logp.view(b, t - 1),
        entropy=entropy.view(b, t - 1) if return_entropy else None,
        logits=logits_out,
        hidden=hidden if return_hidden else None,
    )


class ValueHead(nn.Module):
    """Scalar value head V(x_≤t) on a causal LM's hidden states, for PPO's critic.

    A linear map H → 1, zero-initialised so the critic starts at V = 0 (no bias in the first
    advantages). Computes in fp32 whatever the backbone dtype.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B, T, H) hidden states → (B, T) float32 values."""
        return self.summary(hidden.float()).squeeze(-1)
