"""The half-precision rollout copy: a faithful rounded copy, refreshed by sync, sampling only."""

import pytest
import torch

from tether.models import SamplingConfig, apply_peft, forward_logprobs, generate, tiny_causal_lm
from tether.models.rollout import RolloutWeights, rollout_weights


def _prompts(tok):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in ["The film", "I liked it a"]]


@pytest.mark.parametrize("tied", [True, False])
def test_copy_is_the_rounded_model_with_its_own_storage(tied):
    pol = tiny_causal_lm(seed=1, tie_word_embeddings=tied)
    model = pol.model
    rw = RolloutWeights(model, torch.bfloat16)
    src, dst = dict(model.named_parameters()), dict(rw.model.named_parameters())
    assert src.keys() == dst.keys()
    for name, p in src.items():
        assert dst[name].dtype == torch.bfloat16
        assert torch.equal(dst[name], p.detach().to(torch.bfloat16)), name
        assert dst[name].data_ptr() != p.data_ptr()
    for name, b in rw.model.named_buffers():  # buffers (rotary frequencies) keep their dtype
        assert b.dtype == dict(model.named_buffers())[name].dtype
    out = rw.model.get_output_embeddings().weight
    assert (out is rw.model.get_input_embeddings().weight) == tied
    assert not rw.model.training
    assert model.get_input_embeddings().weight.dtype == torch.float32  # the model is untouched


def test_sync_refreshes_the_copy_after_an_update():
    model = tiny_causal_lm(seed=2).model
    rw = RolloutWeights(model, torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    stale = next(rw.model.parameters()).clone()
    assert not torch.equal(stale, next(model.parameters()).to(torch.bfloat16))
    rw.sync()
    for (name, p), q in zip(model.named_parameters(), rw.model.parameters(), strict=True):
        assert torch.equal(q, p.detach().to(torch.bfloat16)), name


def test_the_copy_samples_and_the_model_scores():
    pol = tiny_causal_lm(seed=3)
    model, tok = pol.model, pol.tokenizer
    rw = RolloutWeights(model, torch.bfloat16)
    greedy = SamplingConfig(max_new_tokens=8, do_sample=False)
    r = generate(model, tok, _prompts(tok), greedy, sampler=rw.model)
    alone = generate(rw.model, tok, _prompts(tok), greedy, compute_logprobs=False)
    assert torch.equal(r.input_ids, alone.input_ids)  # the copy drew the tokens
    p = r.prompt_length
    full = forward_logprobs(model, r.input_ids, r.attention_mask).logprobs[:, p - 1 :]
    m = r.response_mask
    torch.testing.assert_close(r.logprobs[m], full[m], atol=1e-5, rtol=0)  # fp32 model scored
    assert r.logprobs.dtype == torch.float32


def test_rollout_weights_setting():
    model = tiny_causal_lm(seed=4).model
    assert rollout_weights(model, "auto", "no") is None  # fp32 training: nothing to gain
    assert rollout_weights(model, "train", "bf16") is None
    assert rollout_weights(model, "auto", "bf16").dtype == torch.bfloat16
    assert rollout_weights(model, "fp16", "no").dtype == torch.float16
    peft = apply_peft(tiny_causal_lm(seed=4).model, {"r": 2, "target_modules": ["q_proj"]})
    assert rollout_weights(peft, "auto", "bf16") is None  # LoRA: sample with the model
    with pytest.raises(ValueError, match="PEFT"):
        rollout_weights(peft, "bf16", "bf16")
    assert rollout_weights(model, "auto", "bf16", sharded=True) is None  # FSDP / ZeRO-3
    with pytest.raises(ValueError, match="sharded"):
        rollout_weights(model, "bf16", "bf16", sharded=True)
    with pytest.raises(ValueError, match="rollout_dtype must be"):
        rollout_weights(model, "int8", "bf16")
