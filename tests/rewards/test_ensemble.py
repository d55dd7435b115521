"""Reward ensembles (Coste et al. 2023): the three combinations by hand, the ensemble as a reward
function, and ensemble.json as a reward spec with its errors."""

import json

import numpy as np
import pytest

from tether.rewards import make_reward
from tether.rewards.ensemble import (
    ENSEMBLE_FILE,
    EnsembleReward,
    combine_rewards,
    load_ensemble,
    save_ensemble,
)

R = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, -2.0]])  # (k=2, N=3)


def test_combine_by_hand():
    np.testing.assert_allclose(combine_rewards(R, "mean"), [2.0, 0.0, 0.0])
    np.testing.assert_allclose(combine_rewards(R, "worst"), [1.0, 0.0, -2.0])
    # population variance across the two members: 1, 0, 4
    np.testing.assert_allclose(combine_rewards(R, "uwo", 0.5), [2.0 - 0.5, 0.0, 0.0 - 2.0])
    np.testing.assert_allclose(combine_rewards(R, "uwo", 0.0), combine_rewards(R, "mean"))
    with pytest.raises(ValueError, match="unknown combine mode"):
        combine_rewards(R, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(k ≥ 1, N\)"):
        combine_rewards(np.zeros(3), "mean")


def _a(prompts, completions):
    return [float(len(c)) for c in completions]


def _b(prompts, completions):
    return [float(c.count("x")) for c in completions]


def test_ensemble_reward_calls_every_member():
    ens = EnsembleReward([_a, _b], "worst")
    assert ens(["p", "p"], ["xx", "abc"]) == [2.0, 0.0]
    np.testing.assert_allclose(ens.members_scores(["p"], ["xab"]), [[3.0], [1.0]])
    assert ens([], []) == []
    with pytest.raises(ValueError, match="at least one member"):
        EnsembleReward([])


def test_ensemble_dir_is_a_reward_spec(tmp_path):
    spec_a = "tests.helpers.rewards:vowel_fraction"
    spec_b = "tests.helpers.rewards:lowercase_fraction"
    path = save_ensemble(tmp_path / "ens", [spec_a, spec_b], "mean")
    ens = make_reward(str(path))
    assert isinstance(ens, EnsembleReward) and ens.combine == "mean"
    # "eee" : e-fraction 1, lowercase fraction 1; "EEa": 0 and 1/3
    np.testing.assert_allclose(ens(["", ""], ["eee", "EEa"]), [1.0, 1 / 6])


def test_ensemble_file_errors_name_the_file(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / ENSEMBLE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_ensemble(d)
    (d / ENSEMBLE_FILE).write_text(json.dumps({"format": 1, "members": []}))
    with pytest.raises(ValueError, match='"members" must be a non-empty list'):
        load_ensemble(d)
    (d / ENSEMBLE_FILE).write_text(json.dumps({"format": 1, "members": ["x:y"], "combine": "max"}))
    with pytest.raises(ValueError, match="\"combine\" is 'max'"):
        load_ensemble(d)
    with pytest.raises(FileNotFoundError, match="not a reward ensemble"):
        load_ensemble(tmp_path)
