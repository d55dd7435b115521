"""Padding-free packing, the fused LM-head log-prob and activation checkpointing modes: each must
give what the plain padded, checkpoint-free computation gives (values and gradients)."""

import random

import pytest
import torch

import tether.models.logprobs as logprobs_mod
from tether.models import forward_logprobs, position_ids_from_mask, tiny_causal_lm
from tether.models.checkpointing import enable_activation_checkpointing
from tether.models.logprobs import backbone_and_head
from tether.models.packing import (
    first_fit_decreasing,
    packed_hidden,
    packing_supported,
    plan_packing,
)


def _ragged(lengths, t=None, side="right", seed=0, vocab=260):
    t = t or max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), t), generator=g)
    am = torch.zeros(len(lengths), t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        am[i, :n] = True if side == "right" else False
        if side == "left":
            am[i, t - n :] = True
    return ids, am


def _model(seed=0):
    return tiny_causal_lm(seed=seed).model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, ids, am, weights, **kw):
    model.zero_grad()
    mask = am[:, 1:] & am[:, :-1]
    out = forward_logprobs(model, ids, am, mask=mask, **kw)
    (out.logprobs * weights).sum().backward()
    return out.logprobs.detach(), _grads(model)


def _assert_close(a, b, atol):
    la, ga = a
    lb, gb = b
    torch.testing.assert_close(la, lb, atol=atol, rtol=0)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=atol, rtol=1e-3, msg=k)


def test_first_fit_decreasing_respects_capacity_and_keeps_every_item():
    rng = random.Random(0)
    for _ in range(200):
        cap = rng.randint(5, 50)
        lengths = [rng.randint(1, cap) for _ in range(rng.randint(1, 30))]
        bins = first_fit_decreasing(lengths, cap)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
        # first fit leaves at most one bin at most half full (a later item would have fit)
        fills = [sum(lengths[i] for i in b) for b in bins]
        assert sum(2 * f <= cap for f in fills) <= 1
        assert -(-sum(lengths) // cap) <= len(bins) <= len(lengths)
    assert first_fit_decreasing([4, 3, 2, 1], 5) == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match="capacity"):
        first_fit_decreasing([6], 5)


def test_plan_packs_tokens_once_with_restarting_positions():
    ids, am = _ragged([9, 2, 5, 3, 7])
    plan = plan_packing(am, position_ids_from_mask(am))
    assert plan is not None and plan.capacity == 9 and plan.rows == 3  # 26 tokens in 3 × 9
    assert plan.src.numel() == int(am.sum()) == plan.dst.numel()
    assert plan.src.unique().numel() == plan.src.numel()
    assert plan.dst.unique().numel() == plan.dst.numel()
    assert bool(am.reshape(-1)[plan.src].all())
    # every packed sequence's positions run 0..n-1, so the boundaries are visible
    flat = plan.position_ids.reshape(-1)
    starts = (flat[plan.dst] == 0).sum()
    assert int(starts) == 5


def test_plan_declines_when_it_cannot_help_or_cannot_separate():
    ids, am = _ragged([8, 8, 7])
    assert plan_packing(am, position_ids_from_mask(am)) is None  # < 10 % padding
    ids, am = _ragged([8])
    assert plan_packing(am, position_ids_from_mask(am)) is None  # one row
    ids, am = _ragged([6, 3, 3])
    pos = position_ids_from_mask(am)
    pos[2] = pos[2] + 3  # row 2 continues row 1's positions (3, 4, 5 after 0, 1, 2)
    assert plan_packing(am, pos) is None


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_forward_equals_padded_values_and_gradients(monkeypatch, side, temperature):
    model = _model()
    calls = []
    real = logprobs_mod.packed_hidden
    monkeypatch.setattr(
        logprobs_mod, "packed_hidden", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    ids, am = _ragged([13, 4, 9, 2, 6, 11], t=15, side=side)
    assert plan_packing(am, position_ids_from_mask(am)) is not None
    w = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(1))
    packed = _run(model, ids, am, w, temperature=temperature, packing=None)
    padded = _run(model, ids, am, w, temperature=temperature, packing=False)
    _assert_close(packed, padded, atol=2e-5)
    assert len(calls) == 1  # the first run packed, the second did not
    # and the packed hidden states really are zero on padding and equal elsewhere
    backbone, _ = backbone_and_head(model)
    plan = plan_packing(am, position_ids_from_mask(am))
    with torch.no_grad():
        h = packed_hidden(backbone, ids, plan)
        ref = backbone(
            input_ids=ids, attention_mask=am.long(), position_ids=position_ids_from_mask(am)
        ).last_hidden_state
    assert bool((h[~am] == 0).all())
    torch.testing.assert_close(h[am], ref[am], atol=2e-5, rtol=0)


def test_packing_support_is_checked_once_and_failure_means_no_packing():
    model = _model()
    assert packing_supported(backbone_and_head(model)[0])

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.calls = 0

        def forward(self, **kw):
            self.calls += 1
            raise RuntimeError("no packed sequences here")

    broken = Broken()
    assert packing_supported(broken) is False
    assert packing_supported(broken) is False
    assert broken.calls == 1


def _generic_head(monkeypatch):
    monkeypatch.setattr(logprobs_mod, "_fusable_head", lambda *a: False)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_head_equals_generic_head(monkeypatch, temperature):
    model = _model(seed=3)
    ids, am = _ragged([10, 7, 12], t=12)
    w = torch.randn(3, 11, generator=torch.Generator().manual_seed(2))
    fused = _run(model, ids, am, w, temperature=temperature, chunk_size=5)
    _generic_head(monkeypatch)
    generic = _run(model, ids, am, w, temperature=temperature, chunk_size=5)
    _assert_close(fused, generic, atol=1e-5)


def test_fused_head_under_bf16_autocast_matches_generic(monkeypatch):
    model = _model(seed=4)
    ids, am = _ragged([10, 7, 12], t=12)
    w = torch.ones(3, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _run(model, ids, am, w)
    _generic_head(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generic = _run(model, ids, am, w)
    # same bf16 matmuls, fp32 softmax on both sides: only summation order differs
    _assert_close(fused, generic, atol=2e-2)
    assert all(g.dtype == torch.float32 for g in fused[1].values())


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_modes_keep_gradients(mode):
    ids, am = _ragged([12, 5, 9], t=12)
    w = torch.randn(3, 11, generator=torch.Generator().manual_seed(5))
    plain = _model(seed=6)
    plain.train()
    want = _run(plain, ids, am, w)
    model = _model(seed=6)
    enable_activation_checkpointing(model, mode)
    model.train()
    got = _run(model, ids, am, w)
    _assert_close(got, want, atol=1e-5)


def test_selective_checkpointing_under_autocast_needs_no_weight_cast_cache():
    """SAC replays the forward's op sequence; autocast's weight-cast cache would change it."""
    ids, am = _ragged([12, 5, 9], t=12)
    w = torch.ones(3, 11)
    plain = _model(seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        want = _run(plain, ids, am, w)
    model = _model(seed=7)
    enable_activation_checkpointing(model, "selective")
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        got = _run(model, ids, am, w)
    _assert_close(got, want, atol=1e-6)


def test_unknown_checkpointing_mode_is_refused():
    with pytest.raises(ValueError, match="activation_checkpointing"):
        enable_activation_checkpointing(_model(), "sometimes")
