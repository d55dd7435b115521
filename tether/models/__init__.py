"""Loading causal LMs (HF ids, local paths, the embedded SmolLM2 GGUF), tiny test models,
chunked per-token log-probs, value heads, and generation for rollouts."""

from tether.models.fingerprint import model_fingerprint
from tether.models.generation import Rollout, SamplingConfig, generate
from tether.models.loading import (
    EMBEDDED_MODELS,
    Policy,
    apply_peft,
    cache_dir,
    embedded_model_path,
    load_policy,
    prepare_tokenizer,
)
from tether.models.logprobs import (
    LogProbOutput,
    ValueHead,
    backbone_and_head,
    forward_logprobs,
    position_ids_from_mask,
    unwrap_model,
)
from tether.models.tiny import tiny_causal_lm, tiny_tokenizer

__all__ = [
    "EMBEDDED_MODELS",
    "LogProbOutput",
    "Policy",
    "Rollout",
    "SamplingConfig",
    "ValueHead",
    "apply_peft",
    "backbone_and_head",
    "cache_dir",
    "embedded_model_path",
    "forward_logprobs",
    "generate",
    "load_policy",
    "model_fingerprint",
    "position_ids_from_mask",
    "prepare_tokenizer",
    "tiny_causal_lm",
    "tiny_tokenizer",
    "unwrap_model",
]
