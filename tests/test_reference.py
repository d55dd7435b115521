"""Reference policies: each kind gives the expected log-probs and survives a checkpoint."""

import warnings

import pytest
import torch

from tether.data.collate import pad_sequences
from tether.models import apply_peft, forward_logprobs, tiny_causal_lm
from tether.reference import (
    AdapterReference,
    CopyReference,
    PrecomputedReference,
    SyncedReference,
    make_reference,
)


def _batch(seqs, side="right"):
    ids, mask = pad_sequences(seqs, pad_value=259, side=side)
    return ids, mask


SEQS = [[5, 17, 99, 3, 250], [7, 7, 8], [100, 101, 102, 103, 104, 105, 106], [42, 43]]


def _perturb(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_copy_is_frozen_at_construction():
    pol = tiny_causal_lm(seed=1)
    ref = CopyReference(pol.model)
    ids, mask = _batch(SEQS)
    before = forward_logprobs(pol.model, ids, mask).logprobs.detach()
    torch.testing.assert_close(ref.logprobs(ids, mask).logprobs, before, atol=0, rtol=0)
    _perturb(pol.model)
    assert not torch.allclose(forward_logprobs(pol.model, ids, mask).logprobs, before)
    torch.testing.assert_close(ref.logprobs(ids, mask).logprobs, before, atol=0, rtol=0)
    assert not any(p.requires_grad for p in ref.model.parameters())
    low = CopyReference(tiny_causal_lm(seed=1).model, dtype=torch.bfloat16)
    lp_low = low.logprobs(ids, mask).logprobs
    assert lp_low.dtype == torch.float32
    torch.testing.assert_close(lp_low[mask[:, 1:]], before[mask[:, 1:]], atol=0.05, rtol=0)


def test_copy_state_catches_a_reference_rebuilt_from_the_trained_policy():
    pol = tiny_causal_lm(seed=1)
    ref = CopyReference(pol.model)
    state = ref.state_dict()
    CopyReference(tiny_causal_lm(seed=1).model).load_state_dict(state)  # same initial model: ok
    _perturb(pol.model)
    with pytest.raises(ValueError, match="initial model"):
        CopyReference(pol.model).load_state_dict(state)
    with pytest.raises(ValueError, match="'copy' reference"):
        SyncedReference(pol.model, tau=1).load_state_dict(state)


def test_adapter_disabled_equals_the_base_model():
    base = tiny_causal_lm(seed=2)
    peft_model = apply_peft(
        tiny_causal_lm(seed=2).model,
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1},
    )
    _perturb(peft_model, scale=0.5)  # only LoRA weights are trainable: the adapter now matters
    peft_model.train()
    ref = AdapterReference(peft_model)
    ids, mask = _batch(SEQS)
    want = forward_logprobs(base.model, ids, mask).logprobs
    got = ref.logprobs(ids, mask).logprobs
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    pol = forward_logprobs(peft_model.eval(), ids, mask).logprobs
    assert (pol - want)[mask[:, 1:]].abs().max() > 1e-3
    peft_model.train()
    ref.logprobs(ids, mask)
    assert peft_model.training  # the reference call restored train mode
    with pytest.raises(ValueError, match="PEFT"):
        AdapterReference(base.model)


def test_synced_mixes_every_tau_steps_and_round_trips():
    pol = tiny_causal_lm(seed=3)
    ref = SyncedReference(pol.model, alpha=0.25, tau=2)
    theta_ref0 = {n: p.clone() for n, p in ref.model.named_parameters()}
    _perturb(pol.model, scale=0.1)
    theta = {n: p.detach().clone() for n, p in pol.model.named_parameters()}
    ref.on_step(pol.model, step=1)  # not a multiple of tau: no change
    for n, p in ref.model.named_parameters():
        assert torch.equal(p, theta_ref0[n])
    ref.on_step(pol.model, step=2)
    for n, p in ref.model.named_parameters():
        torch.testing.assert_close(p, 0.25 * theta[n] + 0.75 * theta_ref0[n], atol=1e-7, rtol=0)
    state = ref.state_dict()
    fresh = SyncedReference(tiny_causal_lm(seed=3).model, alpha=0.25, tau=2)
    fresh.load_state_dict(state)
    ids, mask = _batch(SEQS)
    torch.testing.assert_close(
        fresh.logprobs(ids, mask).logprobs, ref.logprobs(ids, mask).logprobs, atol=0, rtol=0
    )
    assert fresh.syncs == 1
    hard = SyncedReference(tiny_causal_lm(seed=3).model, alpha=1.0, tau=1)
    hard.on_step(pol.model, step=1)
    for n, p in hard.model.named_parameters():
        assert torch.equal(p, theta[n])
    with pytest.raises(ValueError, match="alpha"):
        SyncedReference(pol.model, alpha=0.0)
    with pytest.raises(ValueError, match="PEFT"):
        SyncedReference(apply_peft(tiny_causal_lm().model, {"r": 2, "target_modules": ["q_proj"]}))


def test_precomputed_matches_live_reference_in_any_layout(tmp_path, monkeypatch):
    pol = tiny_causal_lm(seed=4)
    live = CopyReference(pol.model)
    batches = []
    for i in (0, 2):
        ids, mask = _batch(SEQS[i : i + 2])
        batches.append({"input_ids": ids, "attention_mask": mask})
    pre = PrecomputedReference.build(pol.model, batches, tmp_path, data_fingerprint="abc")
    assert pre.meta["sequences"] == 4
    # a different batching, left padding, shuffled order
    order = [2, 0, 3, 1]
    ids, mask = _batch([SEQS[i] for i in order], side="left")
    want = live.logprobs(ids, mask).logprobs
    valid = mask[:, 1:] & mask[:, :-1]
    got = pre.logprobs(ids, mask).logprobs
    torch.testing.assert_close(got[valid], want[valid], atol=1e-6, rtol=0)
    assert (got[~valid] == 0).all()
    # a second build finds the cache and does not run the model
    monkeypatch.setattr(
        "tether.reference._frozen_logprobs", lambda *a, **k: pytest.fail("recomputed")
    )
    again = PrecomputedReference.build(pol.model, batches, tmp_path, data_fingerprint="abc")
    assert again.path == pre.path
    again.load_state_dict(pre.state_dict())
    with pytest.raises(KeyError, match="not in the precomputed reference cache"):
        pre.logprobs(*_batch([[1, 2, 3]]))
    monkeypatch.undo()
    # built under bf16 autocast it is another cache (the precision is part of what it holds)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = PrecomputedReference.build(pol.model, batches, tmp_path, data_fingerprint="abc")
    assert low.path != pre.path and low.meta["precision"] == "bfloat16"
    assert pre.meta["precision"] == "exact"
    with pytest.raises(ValueError, match="live"):
        pre.logprobs(ids, mask, return_logits=True)


def test_make_reference_kinds():
    pol = tiny_causal_lm(seed=5)
    assert make_reference("copy", pol.model).kind == "copy"
    assert make_reference("synced", pol.model, sync_tau=4).tau == 4
    with pytest.raises(ValueError, match="copy/adapter/precomputed/synced"):
        make_reference("frozen", pol.model)
    with pytest.raises(ValueError, match="cache path"):
        make_reference("precomputed", pol.model)


def test_precomputed_reference_with_a_repeated_sequence_builds_and_reloads(tmp_path, monkeypatch):
    """A response shared by two preference pairs (common: pairs drawn from one pool of samples)
    is one table entry; the metadata counts the table's tokens, so the cache reloads without
    a rebuild (it used to count the repeat twice and refuse its own cache)."""
    pol = tiny_causal_lm(seed=4)
    ids, mask = _batch([SEQS[0], SEQS[1], SEQS[0]])  # SEQS[0] twice
    batches = [{"input_ids": ids, "attention_mask": mask}]
    pre = PrecomputedReference.build(pol.model, batches, tmp_path, data_fingerprint="dup")
    assert pre.meta["sequences"] == 2
    assert pre.meta["tokens"] == (len(SEQS[0]) - 1) + (len(SEQS[1]) - 1)
    monkeypatch.setattr("tether.reference._frozen_logprobs", lambda *a, **k: pytest.fail("rebuilt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = PrecomputedReference.build(pol.model, batches, tmp_path, data_fingerprint="dup")
    assert again.meta == pre.meta
