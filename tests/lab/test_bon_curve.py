"""The one-pool best-of-n estimator against brute-force enumeration of every n-subset."""

import itertools
import math

import numpy as np
import pytest

from tether.core.kl import best_of_n_kl
from tether.lab.bon import bon_curve, pick_weights


def _brute(proxy_row, gold_row, n):
    """Mean over all n-subsets of (proxy, gold) of the first argmax of the proxy in the subset."""
    ps, gs = [], []
    for subset in itertools.combinations(range(len(proxy_row)), n):
        best = max(subset, key=lambda i: (proxy_row[i], -i))  # first sample wins a tie
        ps.append(proxy_row[best])
        gs.append(gold_row[best])
    return np.mean(ps), np.mean(gs)


@pytest.mark.parametrize("pool,n", [(6, 1), (6, 2), (6, 3), (7, 7), (12, 4)])
def test_weights_sum_to_one_and_match_the_combinatorics(pool, n):
    w = pick_weights(pool, n)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    for i in range(1, pool + 1):
        expected = math.comb(i - 1, n - 1) / math.comb(pool, n)
        assert w[i - 1] == pytest.approx(expected, rel=1e-10, abs=1e-15)


def test_curve_equals_enumeration_with_ties():
    rng = np.random.default_rng(0)
    proxy = rng.integers(0, 4, size=(5, 8)).astype(float)  # many ties
    gold = rng.normal(size=(5, 8))
    ns = [1, 2, 3, 5, 8]
    points = bon_curve(proxy, gold, ns)
    for pt, n in zip(points, ns, strict=True):
        brute = [_brute(proxy[k], gold[k], n) for k in range(5)]
        assert pt.proxy == pytest.approx(np.mean([b[0] for b in brute]), abs=1e-12)
        assert pt.gold == pytest.approx(np.mean([b[1] for b in brute]), abs=1e-12)
        assert pt.kl_bound == best_of_n_kl(n)
    # n = 1 is the plain mean; n = N is the first argmax of each row
    assert points[0].gold == pytest.approx(gold.mean())
    firsts = [gold[k][int(np.argmax(proxy[k]))] for k in range(5)]
    assert points[-1].gold == pytest.approx(np.mean(firsts))


def test_proxy_is_monotone_in_n_and_errors():
    rng = np.random.default_rng(1)
    proxy = rng.normal(size=(20, 64))
    pts = bon_curve(proxy, -proxy, [1, 2, 4, 8, 16, 32, 64])
    assert all(a.proxy < b.proxy for a, b in zip(pts, pts[1:], strict=False))
    assert all(a.gold > b.gold for a, b in zip(pts, pts[1:], strict=False))  # a disagreeing gold
    assert pts[0].gold_se == pytest.approx(np.std(-proxy.mean(1), ddof=1) / math.sqrt(20))
    with pytest.raises(ValueError, match="n must be in 1..64"):
        bon_curve(proxy, proxy, [65])
    with pytest.raises(ValueError, match=r"\(P, N\)"):
        bon_curve(proxy, proxy[:, :3], [1])
