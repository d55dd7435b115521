"""Rollouts: masks after EOS, behaviour log-probs equal the training forward, sampler mismatch."""

import pytest
import torch

from tether.models import (
    SamplingConfig,
    forward_logprobs,
    generate,
    tiny_causal_lm,
)
from tether.models.generation import response_mask_from_ids


def _prompts(tok):
    texts = ["The movie was", "I think", "A long prompt about a film that I saw"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _eos_prone_policy(seed=0, eos_bias=4.0):
    """A tiny model whose head favours EOS, so responses end at different lengths."""
    pol = tiny_causal_lm(seed=seed, tie_word_embeddings=False)
    head = pol.model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    with torch.no_grad():
        head.bias[pol.tokenizer.eos_token_id] = eos_bias
    return pol


def test_response_mask_from_ids():
    ids = torch.tensor([[5, 6, 2, 9, 2], [2, 7, 7, 7, 7], [1, 1, 1, 1, 1]])
    mask, finished = response_mask_from_ids(ids, [2])
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, False, False, False, False],
        [True, True, True, True, True],
    ]
    assert finished.tolist() == [True, True, False]


def test_rollout_masks_and_consistent_logprobs():
    pol = _eos_prone_policy()
    tok = pol.tokenizer
    prompts = _prompts(tok)
    r = generate(pol.model, tok, prompts, SamplingConfig(max_new_tokens=16), generator_seed=0)
    b, p = len(prompts), max(len(x) for x in prompts)
    assert r.prompt_length == p and r.input_ids.shape == (b, p + r.response_ids.shape[1])
    lengths = r.response_lengths.tolist()
    assert len(set(lengths)) > 1, lengths  # EOS at different places: masks really matter
    for i in range(b):
        n = lengths[i]
        if r.finished[i]:
            assert r.response_ids[i, n - 1] == tok.eos_token_id  # EOS kept in the response
        assert (r.response_ids[i, n:] == tok.pad_token_id).all()
        assert not r.attention_mask[i, p + n :].any()
        assert r.attention_mask[i, :p].sum() == len(prompts[i])  # left padding
        assert (r.logprobs[i, n:] == 0).all() and (r.sampler_logprobs[i, n:] == 0).all()
    # behaviour log-probs == a fresh training forward over the whole sequence
    full = forward_logprobs(pol.model, r.input_ids, r.attention_mask)
    torch.testing.assert_close(
        r.logprobs[r.response_mask], full.logprobs[:, p - 1 :][r.response_mask], atol=1e-5, rtol=0
    )
    # temperature 1, no truncation: the sampler's distribution IS the policy (KV cache vs full)
    torch.testing.assert_close(
        r.sampler_logprobs[r.response_mask], r.logprobs[r.response_mask], atol=1e-4, rtol=0
    )


def test_temperature_is_part_of_the_policy_truncation_is_not():
    pol = tiny_causal_lm(seed=3)
    tok = pol.tokenizer
    prompts = _prompts(tok)
    warm = generate(pol.model, tok, prompts, SamplingConfig(max_new_tokens=8, temperature=0.6), 1)
    m = warm.response_mask
    # π_θ at T=0.6 is what the training forward computes with temperature=0.6
    torch.testing.assert_close(warm.sampler_logprobs[m], warm.logprobs[m], atol=1e-4, rtol=0)
    t1 = forward_logprobs(pol.model, warm.input_ids, warm.attention_mask).logprobs
    assert (t1[:, warm.prompt_length - 1 :][m] - warm.logprobs[m]).abs().max() > 1e-2

    topk = generate(pol.model, tok, prompts, SamplingConfig(max_new_tokens=8, top_k=5), 1)
    m = topk.response_mask
    gap = topk.sampler_logprobs[m] - topk.logprobs[m]
    assert (gap >= -1e-5).all()  # renormalising over the top 5 only raises log-probs
    assert gap.mean() > 0.5  # and by a lot for a near-uniform tiny model over 260 tokens


def test_same_seed_same_rollout_and_greedy():
    pol = tiny_causal_lm(seed=5)
    tok = pol.tokenizer
    prompts = _prompts(tok)
    cfg = SamplingConfig(max_new_tokens=6)
    a = generate(pol.model, tok, prompts, cfg, generator_seed=7)
    b = generate(pol.model, tok, prompts, cfg, generator_seed=7)
    assert torch.equal(a.input_ids, b.input_ids)
    g = generate(pol.model, tok, prompts, SamplingConfig(max_new_tokens=6, do_sample=False))
    full = forward_logprobs(pol.model, g.input_ids, g.attention_mask, return_logits=True)
    argmax = full.logits[:, g.prompt_length - 1 :].argmax(-1)
    assert torch.equal(argmax[g.response_mask], g.response_ids[g.response_mask])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
    ],
)
def test_sampling_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)
