"""Chunked per-token log-probs against a plain full log-softmax, with masks, grads, PEFT."""

import pytest
import torch

from tests.helpers.alloc import AllocationRecorder
from tether.core.kl import exact_from_logits
from tether.models import (
    ValueHead,
    apply_peft,
    forward_logprobs,
    position_ids_from_mask,
    tiny_causal_lm,
)


def _batch(seed=0, b=3, t=17, vocab=260, left_pad=(0, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.bool)
    for i, n in enumerate(left_pad):
        mask[i, :n] = False
    return ids, mask


def _plain(model, ids, mask, temperature=1.0):
    out = model(
        input_ids=ids,
        attention_mask=mask.long(),
        position_ids=position_ids_from_mask(mask),
        use_cache=False,
    )
    logits = out.logits[:, :-1].float() / temperature
    lp = torch.log_softmax(logits, -1)
    return lp.gather(-1, ids[:, 1:, None]).squeeze(-1), lp


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_plain_log_softmax(chunk_size, temperature):
    pol = tiny_causal_lm(seed=1)
    ids, mask = _batch()
    want, lp_full = _plain(pol.model, ids, mask, temperature)
    got = forward_logprobs(
        pol.model,
        ids,
        mask,
        temperature=temperature,
        chunk_size=chunk_size,
        return_entropy=True,
        return_logits=True,
    )
    torch.testing.assert_close(got.logprobs, want, atol=1e-5, rtol=0)
    entropy = -(lp_full.exp() * lp_full).sum(-1)
    torch.testing.assert_close(got.entropy, entropy, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.log_softmax(got.logits.float(), -1), lp_full, atol=1e-5, rtol=0
    )


def test_mask_skips_positions_and_gradients_match():
    pol = tiny_causal_lm(seed=2)
    ids, mask = _batch(seed=3)
    need = torch.zeros(3, 16, dtype=torch.bool)
    need[:, 8:] = True  # e.g. only the response
    got = forward_logprobs(pol.model, ids, mask, mask=need, chunk_size=5)
    assert (got.logprobs[~need] == 0).all()
    loss = -(got.logprobs * need).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pol.model.named_parameters()}
    pol.model.zero_grad()
    want, _ = _plain(pol.model, ids, mask)
    torch.testing.assert_close(got.logprobs[need], want[need].detach(), atol=1e-5, rtol=0)
    (-(want * need).sum()).backward()
    for n, p in pol.model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_peft_model_and_value_head():
    pol = tiny_causal_lm(seed=4)
    peft_model = apply_peft(pol.model, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    ids, mask = _batch(seed=5)
    out = forward_logprobs(peft_model, ids, mask, return_hidden=True)
    want, _ = _plain(peft_model, ids, mask)
    torch.testing.assert_close(out.logprobs, want, atol=1e-5, rtol=0)
    head = ValueHead(out.hidden.shape[-1])
    values = head(out.hidden)
    assert values.shape == ids.shape and values.dtype == torch.float32
    assert (values == 0).all()  # zero-initialised critic


def test_logits_feed_exact_kl():
    pol, ref = tiny_causal_lm(seed=6), tiny_causal_lm(seed=7)
    ids, mask = _batch(seed=8)
    a = forward_logprobs(pol.model, ids, mask, return_logits=True)
    b = forward_logprobs(ref.model, ids, mask, return_logits=True)
    kl_same = exact_from_logits(a.logits, a.logits, mask[:, 1:])
    kl_diff = exact_from_logits(a.logits, b.logits, mask[:, 1:])
    assert kl_same.abs().max() < 1e-6
    assert (kl_diff[mask[:, 1:]] > 0).all()


def test_bad_shapes():
    pol = tiny_causal_lm()
    ids, mask = _batch()
    with pytest.raises(ValueError, match="mask must be"):
        forward_logprobs(pol.model, ids, mask, mask=torch.ones(3, 17, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        forward_logprobs(pol.model, ids, mask, temperature=0.0)
    with pytest.raises(ValueError, match="attention_mask"):
        forward_logprobs(pol.model, ids, mask[:, :-1])


def test_head_memory_is_bounded_by_the_chunk():
    """No (B, T−1, V) logits tensor is ever allocated, in forward or backward."""
    pol = tiny_causal_lm(seed=9)
    ids, mask = _batch(seed=10, b=4, t=33, left_pad=(0, 0, 0, 0))
    vocab, chunk = pol.model.config.vocab_size, 16
    with AllocationRecorder() as rec:
        out = forward_logprobs(pol.model, ids, mask, chunk_size=chunk)
        out.logprobs.sum().backward()
    full = 4 * 32 * vocab
    assert max(rec.sizes) < full / 1.5, (max(rec.sizes), full)
    assert chunk * vocab in rec.sizes  # the head ran on (chunk, V) pieces
    with AllocationRecorder() as plain:
        _plain(pol.model, ids, mask)[0].sum().backward()
    assert max(plain.sizes) >= full
