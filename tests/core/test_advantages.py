"""GAE, GRPO and RLOO advantages against hand-computed values and an independent sum formula."""

import pytest
import torch

from tether.core.advantages import (
    gae,
    gae_recursion,
    group_relative,
    leave_one_out,
    whiten_advantages,
)


def _gae_by_sum(r, v, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l} over one terminating episode (V after the end = 0)."""
    n = len(r)
    delta = [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
    return [sum((gamma * lam) ** (k - t) * delta[k] for k in range(t, n)) for t in range(n)]


def test_gae_hand_example():
    r = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.2, 0.1]], dtype=torch.float64)
    m = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    # δ = [0 + .9·.2 − .5, 0 + .9·.1 − .2, 1 − .1] = [−.32, −.11, .9]
    # A2 = .9; A1 = −.11 + .72·.9 = .538; A0 = −.32 + .72·.538 = .06736
    torch.testing.assert_close(adv, torch.tensor([[0.06736, 0.538, 0.9]], dtype=torch.float64))
    torch.testing.assert_close(ret, adv + v)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (1.0, 0.0), (0.95, 0.9), (0.5, 0.3)])
def test_gae_matches_sum_formula_on_ragged_masked_rows(gamma, lam):
    g = torch.Generator().manual_seed(0)
    b, t = 5, 9
    r = torch.randn(b, t, generator=g, dtype=torch.float64)
    v = torch.randn(b, t, generator=g, dtype=torch.float64)
    m = torch.zeros(b, t, dtype=torch.bool)
    m[0, 2:7] = True  # left and right padding
    m[1, :] = True
    m[2, 4:] = True
    m[3, [1, 2, 5, 8]] = True  # gaps: the next step is the next masked position
    adv, ret = gae(r, v, m, gamma, lam)
    for i in range(b):
        idx = m[i].nonzero().squeeze(-1).tolist()
        want = _gae_by_sum(r[i, idx].tolist(), v[i, idx].tolist(), gamma, lam)
        torch.testing.assert_close(adv[i, idx], torch.tensor(want, dtype=torch.float64))
    assert bool((adv[~m] == 0).all()) and bool((ret[~m] == 0).all())
    # an empty row is all zeros
    m[4] = False
    adv, _ = gae(r, v, m, gamma, lam)
    assert bool((adv[4] == 0).all())


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    v = torch.tensor([[0.3, 0.1, 0.4, 0.2]], dtype=torch.float64)
    adv, ret = gae(r, v, torch.ones(1, 4, dtype=torch.bool), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[10.0, 9.0, 7.0, 4.0]], dtype=torch.float64))


def test_truncation_bootstraps_without_chaining():
    # two episodes in one row of a vectorised env: t=1 truncated (bootstrap V'=5), t=3 terminated
    r = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    v = torch.tensor([2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
    nv = torch.tensor([3.0, 5.0, 6.0, 0.0], dtype=torch.float64)
    bootstrap = torch.tensor([True, True, True, False])
    chain = torch.tensor([True, False, True, False])
    adv, _ = gae_recursion(r, v, nv, bootstrap, chain, gamma=0.5, lam=1.0)
    d = [1 + 0.5 * 3 - 2, 1 + 0.5 * 5 - 3, 1 + 0.5 * 6 - 4, 1 - 6]  # [.5, .5, 0, −5]
    want = [d[0] + 0.5 * d[1], d[1], d[2] + 0.5 * d[3], d[3]]
    torch.testing.assert_close(adv, torch.tensor(want, dtype=torch.float64))


def test_group_relative_hand_values():
    s = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = group_relative(s, 3, eps=0.0 + 1e-12)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    unscaled = group_relative(torch.tensor([0.0, 4.0]), 2, scale=False)
    torch.testing.assert_close(unscaled, torch.tensor([-2.0, 2.0]))
    # std is Bessel-corrected: [0, 4] has std 2.828…
    torch.testing.assert_close(
        group_relative(torch.tensor([0.0, 4.0]), 2, eps=0.0), torch.tensor([-0.7071068, 0.7071068])
    )


def test_leave_one_out_hand_values_and_identity():
    s = torch.tensor([1.0, 2.0, 3.0, 0.0, 10.0, 20.0])
    adv = leave_one_out(s, 3)
    torch.testing.assert_close(adv[:3], torch.tensor([-1.5, 0.0, 1.5]))
    g = s.view(2, 3)
    torch.testing.assert_close(adv, (1.5 * (g - g.mean(-1, keepdim=True))).reshape(-1))
    with pytest.raises(ValueError, match="group_size ≥ 2"):
        leave_one_out(s, 1)


def test_groups_must_divide_the_batch():
    with pytest.raises(ValueError, match="groups of 4"):
        group_relative(torch.zeros(6), 4)


def test_whitening_is_masked():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[True, True, True, False]])
    w = whiten_advantages(x, m)
    torch.testing.assert_close(w[m].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(w[m].std(), torch.tensor(1.0), atol=1e-4, rtol=0)
    assert w[0, 3] == 0


# -- group baselines over the valid members (reward_on_invalid=skip) ------------------------------

SKIP = float("nan")  # what a skipped sample's reward is (tether.rewards.base.ValidatedRewards)


def _valid(scores):
    return ~torch.isnan(scores)


def test_group_relative_one_skipped_member_uses_the_three_valid():
    # valid [1, 3, 5]: mean 3, deviations [−2, 0, 2], Bessel std √((4 + 0 + 4)/2) = 2
    s = torch.tensor([1.0, 3.0, SKIP, 5.0], dtype=torch.float64)
    adv = group_relative(s, 4, eps=0.0, valid=_valid(s))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    # (filling the slot with the mean 3 and taking the std of all 4 gave √(3/2)× these:
    # std √(8/3) instead of 2, advantages ±1.2247)
    unscaled = group_relative(s, 4, scale=False, valid=_valid(s))
    torch.testing.assert_close(unscaled, torch.tensor([-2.0, 0.0, 0.0, 2.0], dtype=torch.float64))


def test_leave_one_out_one_skipped_member_uses_the_other_valid():
    # baselines over the other valid two: (3 + 5)/2 = 4, (1 + 5)/2 = 3, (1 + 3)/2 = 2
    s = torch.tensor([1.0, 3.0, SKIP, 5.0], dtype=torch.float64)
    adv = leave_one_out(s, 4, valid=_valid(s))
    torch.testing.assert_close(adv, torch.tensor([-3.0, 0.0, 0.0, 3.0], dtype=torch.float64))
    # = n/(n − 1)·(r − mean_v) = 3/2·[−2, 0, 2] (filling with the mean gave 4/3·[−2, 0, 2])


@pytest.mark.parametrize("fn", ["grpo", "grpo_unscaled", "rloo"])
def test_groups_with_one_or_no_valid_member_get_zero(fn):
    # group 0: one valid member; group 1: none; group 2: all valid (control)
    s = torch.tensor([7.0, SKIP, SKIP, SKIP, SKIP, SKIP, 1.0, 2.0, 3.0], dtype=torch.float64)
    valid = _valid(s)
    if fn == "rloo":
        adv = leave_one_out(s, 3, valid=valid)
        last = torch.tensor([-1.5, 0.0, 1.5], dtype=torch.float64)
    else:
        adv = group_relative(s, 3, scale=fn == "grpo", eps=0.0, valid=valid)
        last = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    assert bool(torch.isfinite(adv).all())
    assert adv[:6].abs().max() == 0
    torch.testing.assert_close(adv[6:], last)


def test_all_valid_mask_is_bit_identical_to_no_mask():
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        s = torch.randn(48, generator=g, dtype=dtype)
        ones = torch.ones(48, dtype=torch.bool)
        for size in (2, 3, 4, 8):
            assert torch.equal(group_relative(s, size, valid=ones), group_relative(s, size))
            assert torch.equal(
                group_relative(s, size, scale=False, valid=ones), group_relative(s, size, False)
            )
            assert torch.equal(leave_one_out(s, size, valid=ones), leave_one_out(s, size))


def test_all_valid_groups_are_unchanged_next_to_a_group_with_a_skip():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(12, generator=g)
    valid = torch.ones(12, dtype=torch.bool)
    valid[5] = False  # group 1 of 3 (G = 4)
    for adv, plain in (
        (group_relative(s, 4, valid=valid), group_relative(s, 4)),
        (leave_one_out(s, 4, valid=valid), leave_one_out(s, 4)),
    ):
        assert torch.equal(adv[:4], plain[:4]) and torch.equal(adv[8:], plain[8:])
        assert adv[5] == 0 and not torch.equal(adv[4:8], plain[4:8])


def test_valid_must_be_a_bool_mask_of_the_scores_shape():
    s = torch.zeros(4)
    with pytest.raises(ValueError, match=r"valid must be a \(B,\) = \(4,\) BoolTensor"):
        group_relative(s, 2, valid=torch.ones(4))
    with pytest.raises(ValueError, match="valid must be"):
        leave_one_out(s, 2, valid=torch.ones(3, dtype=torch.bool))
