"""Best-of-N: the pick, the mean rewards, and the KL estimator against exact values."""

import json
import math
import statistics

import numpy as np
import pytest

from tether.bon import BoNResult, best_of_n, bon_kl_estimate, first_order_bias
from tether.cli import main
from tether.core.kl import best_of_n_kl
from tether.models import SamplingConfig, tiny_causal_lm
from tether.rewards import RewardError

SE_TOLERANCE = 4.0
"""Monte-Carlo checks allow this many standard errors (a false failure rate of ≈ 6e-5)."""


def ascii_fraction(prompts: list[str], completions: list[str]) -> list[float]:
    """A cheap deterministic reward: the fraction of the completion's characters that are ASCII."""
    return [sum(ch.isascii() for ch in c) / max(len(c), 1) for c in completions]


# ---------------------------------------------------------------------------------------------
# The estimator, on synthetic rewards (no model)
# ---------------------------------------------------------------------------------------------


def synthetic(rng, draw, n, m, prompts):
    """Per prompt: the best of n draws, and m independent calibration draws."""
    picks = draw(rng, (prompts, n)).max(axis=1)  # (P,)
    return picks, draw(rng, (prompts, m))  # (P,), (P, m)


def normal(rng, shape):
    return rng.standard_normal(shape)


def test_hand_computed_values():
    # L=1 below, E=1 equal, m=3: a = 3/4, b = 1/4, w = (a³ − b³)/(a − b) = 13/16
    assert bon_kl_estimate([2.0], [[1.0, 2.0, 3.0]], 3).per_prompt == pytest.approx(
        (math.log(13 / 16),), abs=1e-15
    )
    # above every calibration sample, m=2: a = 1, b = 2/3, w = (1 − 4/9)/(1/3) = 5/3
    est = bon_kl_estimate([5.0, 2.0], [[0.0, 1.0], [1.0, 2.0, 3.0]], 2)
    assert est.per_prompt == pytest.approx((math.log(5 / 3), math.log(3 / 4 + 1 / 4)), abs=1e-15)
    assert est.mean == pytest.approx(np.mean(est.per_prompt), abs=1e-15)
    assert est.stderr == pytest.approx(np.std(est.per_prompt, ddof=1) / math.sqrt(2), abs=1e-15)
    assert math.isnan(bon_kl_estimate([0.0], [[1.0]], 2).stderr)  # one prompt: no spread


def test_n_one_and_all_tied_give_zero():
    rng = np.random.default_rng(0)
    picks, calib = synthetic(rng, normal, 1, 8, 50)
    assert bon_kl_estimate(picks, calib, 1).per_prompt == (0.0,) * 50
    # every reward tied: best-of-n is the base policy itself
    assert bon_kl_estimate([0.0] * 5, [[0.0] * 8] * 5, 16).per_prompt == (0.0,) * 5


def test_estimate_depends_only_on_ranks():
    rng = np.random.default_rng(1)
    picks, calib = synthetic(rng, normal, 4, 16, 100)
    a = bon_kl_estimate(picks, calib, 4)
    b = bon_kl_estimate(np.exp(3 * picks), np.exp(3 * calib), 4)
    assert a.per_prompt == b.per_prompt


@pytest.mark.parametrize("n", [4, 16])
def test_converges_to_the_analytic_kl_for_a_continuous_reward(n):
    rng = np.random.default_rng(n)
    m = 2000
    picks, calib = synthetic(rng, normal, n, m, 2000)
    est = bon_kl_estimate(picks, calib, n)
    assert abs(first_order_bias(n, m)) < est.stderr / 4  # the bias is negligible here
    assert abs(est.mean - best_of_n_kl(n)) < SE_TOLERANCE * est.stderr
    assert est.stderr < 0.03


def exact_expected_estimate(n: int, m: int) -> float:
    """E[log ŵ] for a continuous reward, summed exactly over the pick's calibration rank K.

    Under π_BoN, u = F(r) ∼ Beta(n, 1) and K | u ∼ Binomial(m, u), so
    P(K = k) = n·C(m, k)·B(k + n, m − k + 1); and ŵ(k) = ((k + 1)ⁿ − kⁿ)/(m + 1)ⁿ⁻¹.
    """
    total = 0.0
    for k in range(m + 1):
        log_p = (
            math.log(n)
            + math.lgamma(m + 1)
            - math.lgamma(k + 1)
            - math.lgamma(m - k + 1)
            + math.lgamma(k + n)
            + math.lgamma(m - k + 1)
            - math.lgamma(m + n + 1)
        )
        w = ((k + 1) ** n - k**n) / (m + 1) ** (n - 1)
        total += math.exp(log_p) * math.log(w)
    return total


def test_finite_calibration_matches_its_exact_expectation_and_is_biased_low():
    n, m = 8, 16
    rng = np.random.default_rng(2)
    picks, calib = synthetic(rng, normal, n, m, 20000)
    est = bon_kl_estimate(picks, calib, n)
    expected = exact_expected_estimate(n, m)
    assert abs(est.mean - expected) < SE_TOLERANCE * est.stderr
    # biased low, by about the first-order value −(n − 1)/(2m)
    assert expected < best_of_n_kl(n)
    assert expected - best_of_n_kl(n) == pytest.approx(first_order_bias(n, m), abs=0.02)


def tied_kl(levels: np.ndarray, n: int) -> float:
    """Exact KL(π_BoN‖π) for a discrete reward with level probabilities ``levels`` (ascending)."""
    cdf = np.cumsum(levels)
    q = cdf**n - np.concatenate([[0.0], cdf[:-1]]) ** n
    return float(np.sum(q * np.log(q / levels)))


CAP_QUANTILE = 0.8
"""The capped-normal reward below puts the top 20% of the mass on one value (a saturated reward)."""
CAP = statistics.NormalDist().inv_cdf(CAP_QUANTILE)


def capped_normal_kl(n: int, a: float = CAP_QUANTILE) -> float:
    """Exact KL for r = min(z, F⁻¹(a)), z ∼ N(0, 1): continuous below, an atom of mass 1 − a on top.

    Continuous part, u = F(r) ∈ [0, a): ∫₀ᵃ n uⁿ⁻¹ log(n uⁿ⁻¹) du = aⁿ log n + (n − 1)(aⁿ log a −
    aⁿ/n). Atom: q log(q/p) with p = 1 − a and q = 1 − aⁿ.
    """
    continuous = a**n * math.log(n) + (n - 1) * (a**n * math.log(a) - a**n / n)
    q, p = 1 - a**n, 1 - a
    return continuous + q * math.log(q / p)


@pytest.mark.parametrize(
    ("name", "draw", "exact"),
    [
        (
            "bernoulli",
            lambda rng, s: (rng.random(s) < 0.3).astype(float),
            tied_kl(np.array([0.7, 0.3]), 16),
        ),
        (
            "capped",
            lambda rng, s: np.minimum(rng.standard_normal(s), CAP),
            capped_normal_kl(16),
        ),
    ],
)
def test_ties_estimate_the_smaller_true_kl(name, draw, exact):
    n, m = 16, 2000
    rng = np.random.default_rng(3)
    picks, calib = synthetic(rng, draw, n, m, 2000)
    est = bon_kl_estimate(picks, calib, n)
    bias_allowance = abs(first_order_bias(n, m))
    assert abs(est.mean - exact) < SE_TOLERANCE * est.stderr + bias_allowance, name
    assert exact < best_of_n_kl(n) - 0.3, name
    assert est.mean < best_of_n_kl(n) - 10 * est.stderr, name


def test_estimator_errors():
    with pytest.raises(ValueError, match="n must be an integer ≥ 1"):
        bon_kl_estimate([0.0], [[0.0]], 0)
    with pytest.raises(ValueError, match="2 pick rewards but 1 calibration rows"):
        bon_kl_estimate([0.0, 1.0], [[0.0]], 2)
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty"):
        bon_kl_estimate([0.0, 1.0], [[0.0], []], 2)
    with pytest.raises(ValueError, match="prompt 0: rewards must be finite"):
        bon_kl_estimate([math.nan], [[0.0]], 2)
    with pytest.raises(ValueError, match="at least one prompt"):
        bon_kl_estimate([], [], 2)


# ---------------------------------------------------------------------------------------------
# best_of_n on a tiny model
# ---------------------------------------------------------------------------------------------

PROMPTS = [f"Review {i}: the film was" for i in range(12)]
N, CALIBRATION = 4, 16
SAMPLING = SamplingConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def policy():
    return tiny_causal_lm(seed=0)


@pytest.fixture(scope="module")
def result(policy) -> BoNResult:
    ids = [policy.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    return best_of_n(
        policy.model,
        policy.tokenizer,
        ids,
        ascii_fraction,
        N,
        SAMPLING,
        calibration=CALIBRATION,
        seed=0,
        batch_size=80,
    )


def test_picks_are_the_argmax_of_their_groups(result):
    assert len(result.samples) == len(PROMPTS) and all(len(g) == N for g in result.samples)
    assert result.prompts == PROMPTS  # decoded from the ids
    for group, rewards, pick, completion, r in zip(
        result.samples,
        result.rewards,
        result.picks,
        result.completions,
        result.pick_rewards,
        strict=True,
    ):
        rescored = ascii_fraction([""] * N, group)
        assert rewards == rescored
        assert pick == rescored.index(max(rescored))  # the first maximum
        assert completion == group[pick] and r == max(rescored)


def test_bon_improves_reward_within_the_kl_bound(result):
    assert result.mean_reward_bon >= result.mean_reward_plain
    assert result.mean_reward_plain == pytest.approx(np.mean(result.rewards), abs=1e-15)
    assert result.mean_reward_bon > result.mean_reward_plain  # the samples differ
    assert result.kl_bound == pytest.approx(math.log(N) - (N - 1) / N, abs=1e-15)
    kl = result.kl
    assert len(kl.per_prompt) == len(PROMPTS)
    assert kl.mean >= 0.0
    assert kl.mean <= result.kl_bound + SE_TOLERANCE * kl.stderr


def test_seed_reproduces_and_reward_sees_prompt_texts(policy, result):
    seen: list[list[str]] = []

    def recording(prompts, completions):
        seen.append(list(prompts))
        return ascii_fraction(prompts, completions)

    ids = [policy.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    texts = [f"text {i}" for i in range(len(PROMPTS))]
    again = best_of_n(
        policy.model,
        policy.tokenizer,
        ids,
        recording,
        N,
        SAMPLING,
        calibration=CALIBRATION,
        seed=0,
        prompts=texts,
        batch_size=80,
    )
    assert again.samples == result.samples and again.kl == result.kl
    assert seen == [[t for t in texts for _ in range(N + CALIBRATION)]]


def test_best_of_n_errors(policy):
    ids = [[1, 2, 3]]
    args = (policy.model, policy.tokenizer, ids, ascii_fraction)
    with pytest.raises(ValueError, match="n must be an integer ≥ 1"):
        best_of_n(*args, 0, SAMPLING)
    with pytest.raises(ValueError, match="calibration must be an integer ≥ 1"):
        best_of_n(*args, 2, SAMPLING, calibration=0)
    with pytest.raises(ValueError, match="needs sampling"):
        best_of_n(*args, 2, SamplingConfig(do_sample=False))
    with pytest.raises(ValueError, match="2 prompt texts for 1 prompt_ids"):
        best_of_n(*args, 2, SAMPLING, prompts=["a", "b"])

    def broken(prompts, completions):
        return [math.nan] * len(completions)

    with pytest.raises(RewardError, match=r"reward '.*broken' returned nan for sample 0"):
        best_of_n(policy.model, policy.tokenizer, ids, broken, 2, SAMPLING, calibration=1)


# ---------------------------------------------------------------------------------------------
# tether bon
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, policy):
    path = tmp_path_factory.mktemp("tiny")
    policy.model.save_pretrained(path)
    policy.tokenizer.save_pretrained(path)
    return path


def test_cli_bon_end_to_end(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:5]))
    out = tmp_path / "out" / "picks.jsonl"
    argv = [
        "bon",
        "--model", str(tiny_dir),
        "--prompts", str(prompts),
        "--reward", "length",
        "--n", "4",
        "--max-new-tokens", "8",
        "--calibration", "4",
        "--limit", "3",
        "--as-chat",
        "--out", str(out),
        "--seed", "0",
        "--eval-reward", "tests.helpers.rewards:lowercase_fraction",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for label in ("mean reward, plain samples", "mean reward, best-of-n", "KL bound", "± "):
        assert label in printed
    for label in ("gold lowercase_fraction, best-of-n", "proxy–gold gap (lowercase_fraction"):
        assert label in printed
    assert f"{best_of_n_kl(4):.4f}" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r, text in zip(rows, PROMPTS, strict=False):
        assert text in r["prompt"] and r["prompt"].startswith("<|im_start|>user")
        assert len(r["candidate_rewards"]) == 4
        assert r["reward"] == max(r["candidate_rewards"]) == len(r["completion"]) / 100
        c = r["completion"]
        lower = sum("a" <= ch <= "z" for ch in c) / len(c) if c else 0.0
        assert r["gold/lowercase_fraction"] == pytest.approx(lower)


def test_cli_bon_reports_bad_reward(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    argv = ["bon", "--model", str(tiny_dir), "--prompts", str(prompts), "--reward", "nope"]
    assert main(argv) == 2
    assert "unknown reward 'nope'" in capsys.readouterr().err


def test_gold_rewards_are_measured_on_the_candidates_and_never_pick(policy):
    """A gold that is the proxy's negative: the picks are the proxy's argmax all the same, the
    gold of the picks is the negated proxy of the picks, and the standardised gap is twice the
    proxy's gain in its own σ units."""
    ids = [policy.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]

    def negated(prompts, completions):
        return [-v for v in ascii_fraction(prompts, completions)]

    kw = dict(calibration=CALIBRATION, seed=0, batch_size=80)
    plain = best_of_n(policy.model, policy.tokenizer, ids, ascii_fraction, N, SAMPLING, **kw)
    res = best_of_n(
        policy.model,
        policy.tokenizer,
        ids,
        ascii_fraction,
        N,
        SAMPLING,
        gold_rewards={"neg": negated},
        **kw,
    )
    assert res.picks == plain.picks and res.rewards == plain.rewards
    assert res.gold["neg"] == [[-v for v in row] for row in res.rewards]
    assert res.gold_bon("neg") == pytest.approx(-res.mean_reward_bon)
    assert res.gold_plain("neg") == pytest.approx(-res.mean_reward_plain)
    sd = float(np.std(res.rewards))
    gain = (res.mean_reward_bon - res.mean_reward_plain) / sd
    assert res.proxy_gold_gap("neg") == pytest.approx(2 * gain)
    assert gain > 0
