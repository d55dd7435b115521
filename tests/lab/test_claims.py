"""The claims' verdicts on synthetic arms: on the same frontier vs off it, diversity against β,
ensembles at equal KL, and DPO's frontier against RL's."""

import math

import pytest

from tether.lab.claims import all_claims, compare_at_equal_kl, envelope, gold_at


def _pts(curve, ds, se=0.01, **extra):
    return [
        {"sqrt_kl": d, "kl": d * d, "gold": curve(d), "gold_se": se, "proxy": d, **extra}
        for d in ds
    ]


def _arm(name, method, proxy, settings, points):
    return {
        "name": name,
        "kind": "trained",
        "method": method,
        "proxy": proxy,
        "seed": 0,
        "settings": settings,
        "points": points,
    }


def rl_curve(d):
    return d * (1.0 - 0.5 * math.log(d)) if d > 0 else 0.0


def test_gold_at_interpolates_and_refuses_to_extrapolate():
    pts = _pts(lambda d: 2 * d, [0.0, 1.0, 2.0])
    assert gold_at(pts, 1.5) == (pytest.approx(3.0), pytest.approx(0.01))
    assert math.isnan(gold_at(pts, 2.5)[0])
    assert [p["sqrt_kl"] for p in envelope(_pts(lambda d: -abs(d - 1), [0, 0.5, 1, 2]))] == [
        0,
        0.5,
        1,
    ]


def test_claim_a_same_frontier_vs_off_it():
    dense = [i / 8 for i in range(33)]  # linear interpolation of a concave curve is low by O(h²)
    beta0 = _arm("g0", "grpo", "n64", {"kl_coef": 0.0}, _pts(rl_curve, dense))
    on = _arm("g1", "grpo", "n64", {"kl_coef": 0.1}, _pts(rl_curve, [0, 0.4, 0.8, 1.2]))
    res = all_claims({"arms": [beta0, on]})
    assert res["a"]["tested"] and res["a"]["verdict"].startswith("Consistent with Gao")
    above = _arm(
        "g1",
        "grpo",
        "n64",
        {"kl_coef": 0.1},
        _pts(lambda d: rl_curve(d) + 0.3 * (d > 0), [0, 0.4, 0.8, 1.2]),
    )
    res = all_claims({"arms": [beta0, above]})
    assert res["a"]["verdict"].startswith("Not what Gao")
    assert res["a"]["rows"][0]["diff"] == pytest.approx(0.3, abs=0.005)
    assert not all_claims({"arms": [beta0]})["a"]["tested"]


def test_claim_b_diversity_against_beta():
    arms = [
        _arm(f"g{b}", "grpo", "n64", {"kl_coef": b}, _pts(rl_curve, [0, 1], ead_2=0.5 + b))
        for b in (0.0, 0.1, 0.3)
    ]
    res = all_claims({"arms": arms})["b"]
    assert res["tested"] and res["verdict"].startswith("No: a higher penalty kept *more*")
    arms = [
        _arm(f"g{b}", "grpo", "n64", {"kl_coef": b}, _pts(rl_curve, [0, 1], ead_2=0.9 - b))
        for b in (0.0, 0.1, 0.3)
    ]
    assert all_claims({"arms": arms})["b"]["verdict"].startswith("Yes")


def test_claim_c_ensemble_at_equal_kl():
    single = _arm("g", "grpo", "n64", {"kl_coef": 0.0}, _pts(rl_curve, [0, 1, 2, 3]))
    ens = _arm(
        "g-ens",
        "grpo",
        "n64-mean",
        {"kl_coef": 0.0},
        _pts(lambda d: rl_curve(d) + 0.2 * d, [0, 1, 2, 3]),
    )
    res = all_claims({"arms": [single, ens]})["c"]
    assert res["tested"] and res["verdict"].startswith("Yes in 1 of 1")


def test_claim_d_dpo_frontier_against_rl():
    rl = _arm("g", "grpo", "n64", {"kl_coef": 0.0}, _pts(rl_curve, [0, 1, 2, 3]))
    dpo = _arm("d", "dpo", "n64", {"beta": 0.1}, _pts(lambda d: rl_curve(d) - 0.5 * d, [0, 1, 2]))
    res = all_claims({"arms": [rl, dpo]})["d"]
    assert res["tested"] and res["verdict"].startswith("No: DPO's frontier lies below")
    c = compare_at_equal_kl(envelope(dpo["points"]), envelope(rl["points"]))
    assert c["n"] >= 1 and c["diff"] < 0
    # a DPO run whose gold never beats its start is still compared (its frontier is its points
    # past the start), not declared "not comparable"
    flat = _arm("d", "dpo", "n64", {"beta": 0.1}, _pts(lambda d: -0.2 * d, [0, 0.5, 1]))
    res = all_claims({"arms": [rl, flat]})["d"]
    assert res["verdict"].startswith("No: DPO's frontier lies below") and res["n"] == 1


def test_claim_b_with_seeds_uses_the_seed_to_seed_error_bar():
    def arms(spread):
        out = []
        for b, centre in ((0.0, 0.80), (0.5, 0.90)):
            for seed, sign in ((0, -1), (1, 1)):
                a = _arm(
                    f"g{b}",
                    "grpo",
                    "n64",
                    {"kl_coef": b},
                    _pts(rl_curve, [0, 1], ead_2=centre + sign * spread),
                )
                a["seed"] = seed
                out.append(a)
        return out

    tight = all_claims({"arms": arms(0.01)})["b"]
    # per β: mean ± SD/√2 with SD = 0.01·√2; pooled SD 0.01·√2 (2 df); SE of the difference = SD
    row = tight["rows"][0]
    assert row["diff"] == pytest.approx(0.10)
    assert row["sd"] == pytest.approx(0.01 * math.sqrt(2))
    assert row["se"] == pytest.approx(0.01 * math.sqrt(2))
    assert tight["verdict"].startswith("No: a higher penalty kept *more* diversity")
    assert "beyond two standard errors" in tight["verdict"]
    loose = all_claims({"arms": arms(0.08)})["b"]  # SE 0.113 > 0.10 / 2
    assert loose["verdict"].startswith("No difference detected")
    assert "+0.100 ± 0.113" in loose["verdict"]
