"""Gold-labelled pairs from a pool: ties dropped, winners by the gold, round-robin over prompts,
nested prefixes; and the cached pool (a second call does not sample)."""

import pytest

import tether.lab.pool as pool_mod
from tests.helpers.rewards import lowercase_fraction
from tether.lab.pool import Pool, gold_pairs, sample_pool
from tether.models import SamplingConfig, tiny_causal_lm

POOL = Pool(
    prompts=["p0", "p1", "p2"],
    completions=[["a", "b", "c"], ["d", "e", "f"], ["g", "g", "h"]],
    gold=[[0.0, 1.0, 1.0], [3.0, 2.0, 1.0], [5.0, 5.0, 0.0]],
)


def test_gold_pairs_label_by_gold_and_drop_ties():
    pairs = gold_pairs(POOL, 100, seed=0)
    # p0: (a,b) (a,c) — (b,c) tied; p1: three pairs; p2: (g,h) twice would be duplicates of text
    # g = g (same text) is dropped, the two (g, h) pairs remain
    assert len(pairs) == 2 + 3 + 2
    for p in pairs:
        i = POOL.prompts.index(p.prompt)
        g = dict(zip(POOL.completions[i], POOL.gold[i], strict=True))
        assert g[p.chosen] > g[p.rejected] and p.gap == pytest.approx(g[p.chosen] - g[p.rejected])


def test_gold_pairs_round_robin_and_nested():
    pairs = gold_pairs(POOL, 100, seed=1)
    assert {p.prompt for p in pairs[:3]} == {"p0", "p1", "p2"}  # one per prompt first
    assert gold_pairs(POOL, 4, seed=1) == pairs[:4]  # a smaller N is a prefix
    assert gold_pairs(POOL, 100, seed=2) != pairs  # another seed, another order


def test_sample_pool_is_cached(tmp_path, monkeypatch):
    pol = tiny_causal_lm(seed=0)
    tok = pol.tokenizer
    prompts = ["Say a:", "Say b:"]
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    kw = dict(seed=0, gold_name="lowercase", model_name="tiny")
    sampling = SamplingConfig(max_new_tokens=6)
    path = tmp_path / "pool.json"
    first = sample_pool(path, pol.model, tok, prompts, ids, 3, sampling, lowercase_fraction, **kw)
    assert len(first.completions) == 2 and first.k == 3
    assert first.gold[1] == lowercase_fraction(["", "", ""], first.completions[1])

    def boom(*a, **k):
        raise AssertionError("a cached pool must not sample again")

    monkeypatch.setattr(pool_mod, "sample_texts", boom)
    again = sample_pool(path, pol.model, tok, prompts, ids, 3, sampling, lowercase_fraction, **kw)
    assert again == first
    with pytest.raises(AssertionError, match="must not sample"):
        sample_pool(path, pol.model, tok, prompts, ids, 4, sampling, lowercase_fraction, **kw)
