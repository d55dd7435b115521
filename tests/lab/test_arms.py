"""The best-of-n arm on the tiny model: its curve, its cache (a second run does not sample), and
a changed request re-running."""

import json

import pytest

import tether.lab.arms as arms
from tests.helpers.rewards import lowercase_fraction, vowel_fraction
from tether.lab.arms import ARM_FILE, bon_arm, load_arm
from tether.models import SamplingConfig, tiny_causal_lm

PROMPTS = [f"Say {i}:" for i in range(4)]


@pytest.fixture(scope="module")
def policy():
    return tiny_causal_lm(seed=0)


def _run(policy, arm_dir, **kw):
    tok = policy.tokenizer
    args = dict(
        arm_dir=arm_dir,
        model=policy.model,
        tokenizer=tok,
        prompt_ids=[tok(p, add_special_tokens=False).input_ids for p in PROMPTS],
        prompts=PROMPTS,
        proxy=vowel_fraction,
        gold=lowercase_fraction,
        ns=[1, 2, 4, 8],
        sampling=SamplingConfig(max_new_tokens=8),
        pool=8,
        seed=0,
        names=("vowel_fraction", "lowercase_fraction"),
    )
    args.update(kw)
    return bon_arm(**args)


def test_bon_arm_curve_and_cache(policy, tmp_path, monkeypatch):
    rec = _run(policy, tmp_path / "bon")
    assert rec["schema"] == 1 and rec["kind"] == "bon"
    pts = rec["points"]
    assert [p["n"] for p in pts] == [1, 2, 4, 8]
    assert pts[0]["kl_bound"] == 0.0
    assert all(a["proxy"] <= b["proxy"] for a, b in zip(pts, pts[1:], strict=False))
    assert pts[-1]["proxy"] > pts[0]["proxy"]  # picking helps the proxy on random text
    saved = json.loads((tmp_path / "bon" / ARM_FILE).read_text())
    assert saved == rec

    def no_sampling(*a, **k):
        raise AssertionError("a finished arm must not sample again")

    monkeypatch.setattr(arms, "sample_texts", no_sampling)
    assert _run(policy, tmp_path / "bon") == rec  # resumed from the cache
    with pytest.raises(AssertionError, match="must not sample"):
        _run(policy, tmp_path / "bon", seed=1)  # a changed request runs again
    assert load_arm(tmp_path / "bon", {"other": 1}) is None


def test_bon_arm_errors(policy, tmp_path):
    with pytest.raises(ValueError, match="pool of at least"):
        _run(policy, tmp_path / "x", ns=[1, 16])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ARM_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="delete it to re-run"):
        _run(policy, tmp_path / "bad")
