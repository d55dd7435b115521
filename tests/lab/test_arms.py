"""The best-of-n arm on a pool: its curve and KLs, its cache, and a changed proxy re-running."""

import json

import numpy as np
import pytest

import tether.lab.arms as arms
from tests.helpers.rewards import vowel_fraction
from tether.core.kl import best_of_n_kl
from tether.lab.arms import ARM_FILE, bon_arm, load_arm
from tether.lab.bon import bon_kl_mc
from tether.lab.pool import Pool

rng = np.random.default_rng(0)
LETTERS = list("abcdefghe ")
POOL = Pool(
    prompts=[f"p{i}" for i in range(6)],
    completions=[["".join(rng.choice(LETTERS, 12)) for _ in range(16)] for _ in range(6)],
    gold=[[float(v) for v in rng.normal(size=16)] for _ in range(6)],
)


def _run(arm_dir, proxy=vowel_fraction, name="vowel"):
    return bon_arm(arm_dir, POOL, proxy, [1, 2, 4, 8], proxy_name=name, pool_fingerprint="p")


def test_bon_arm_curve_and_cache(tmp_path, monkeypatch):
    rec = _run(tmp_path / "bon")
    assert rec["schema"] == 1 and rec["kind"] == "bon"
    pts = rec["points"]
    assert [p["n"] for p in pts] == [1, 2, 4, 8]
    assert [p["kl_bound"] for p in pts] == [best_of_n_kl(n) for n in (1, 2, 4, 8)]
    assert all(a["proxy"] <= b["proxy"] for a, b in zip(pts, pts[1:], strict=False))
    assert pts[0]["gold"] == pytest.approx(np.mean(POOL.gold))  # n = 1 is a plain sample
    assert json.loads((tmp_path / "bon" / ARM_FILE).read_text()) == rec

    def no_scoring(*a, **k):
        raise AssertionError("a finished arm must not score again")

    monkeypatch.setattr(arms, "bon_curve", no_scoring)
    assert _run(tmp_path / "bon") == rec  # resumed from the cache
    with pytest.raises(AssertionError, match="must not score"):
        _run(tmp_path / "bon", name="another proxy")
    assert load_arm(tmp_path / "bon", {"other": 1}) is None


def test_bon_kl_mc_tracks_the_analytic_kl():
    """With a continuous proxy and a large pool the Monte-Carlo KL is close to log n − (n−1)/n
    (its bias is about −(n − 1)/(2m) with m = N − n calibration samples)."""
    proxy = np.random.default_rng(1).normal(size=(64, 256))
    for n in (2, 8):
        est, se = bon_kl_mc(proxy, n, repeats=16, seed=0)
        bias = -(n - 1) / (2 * (256 - n))
        assert abs(est - (best_of_n_kl(n) + bias)) < 4 * se + 0.02
    assert np.isnan(bon_kl_mc(proxy[:, :8], 8)[0])  # no calibration left
