"""validate_rewards: the check at the boundary between a reward function and a trainer."""

import math

import numpy as np
import pytest
import torch

from tether.rewards import RewardError, ValidatedRewards, check_texts, reward_name, validate_rewards


def test_valid_rewards_pass_through_as_floats():
    out = validate_rewards([1, 0.5, True, np.float32(-2.0)], 4, "judge")
    assert isinstance(out, ValidatedRewards)
    assert list(out) == [1.0, 0.5, 1.0, -2.0]
    assert all(type(v) is float for v in out)
    assert out.skipped == () and out.num_skipped == 0 and out.valid == [True] * 4
    assert len(out) == 4 and out[1] == 0.5 and out[1:3] == (0.5, 1.0)


@pytest.mark.parametrize("values", [np.array([0.25, -1.0]), torch.tensor([0.25, -1.0])])
def test_arrays_and_tensors_are_accepted(values):
    assert list(validate_rewards(values, 2, "rm")) == [0.25, -1.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_reward_raises_naming_function_sample_and_completion(bad):
    completions = ["fine", "also fine", "the offending completion"]
    with pytest.raises(RewardError) as e:
        validate_rewards([0.0, 1.0, bad], 3, "my_judge", completions=completions)
    msg = str(e.value)
    assert "'my_judge'" in msg and "sample 2" in msg and "the offending completion" in msg
    assert isinstance(e.value, ValueError)


def test_long_completion_is_quoted_as_a_snippet():
    long = "x" * 1000
    with pytest.raises(RewardError) as e:
        validate_rewards([math.nan], 1, "rm", completions=[long])
    assert "x" * 80 + "…" in str(e.value) and "x" * 81 not in str(e.value)


def test_skip_marks_non_finite_as_nan_and_lists_them():
    out = validate_rewards([0.5, math.nan, 2.0, math.inf], 4, "rm", on_invalid="skip")
    assert out.skipped == (1, 3) and out.num_skipped == 2
    assert out.valid == [True, False, True, False]
    assert out[0] == 0.5 and out[2] == 2.0 and math.isnan(out[1]) and math.isnan(out[3])
    kept = [v for v, ok in zip(out, out.valid, strict=True) if ok]
    assert kept == [0.5, 2.0]


def test_wrong_length_names_function_expected_and_got():
    with pytest.raises(RewardError, match=r"'rm' returned 3 values for 4 completions"):
        validate_rewards([0.0, 1.0, 2.0], 4, "rm")


@pytest.mark.parametrize("values", [None, 1.5, "0.5", {"a": 1.0}, np.zeros((2, 1))])
def test_not_a_sequence_names_function_and_type(values):
    with pytest.raises(RewardError, match=r"reward 'rm' returned a \w+; expected a sequence of 2"):
        validate_rewards(values, 2, "rm")


@pytest.mark.parametrize("element", [None, "1.0", 1j, [1.0]])
def test_non_real_element_names_index(element):
    with pytest.raises(RewardError, match=r"'rm': value 1 is a"):
        validate_rewards([0.0, element], 2, "rm")


def test_on_invalid_must_be_known():
    with pytest.raises(ValueError, match="on_invalid"):
        validate_rewards([0.0], 1, "rm", on_invalid="drop")


def test_reward_name():
    class Judge:
        name = "judge-v1"

    def score(prompts, completions):
        return [0.0] * len(completions)

    class Anonymous:
        def __call__(self, prompts, completions):
            return [0.0] * len(completions)

    assert reward_name(Judge()) == "judge-v1"
    assert reward_name(score) == "test_reward_name.<locals>.score"
    assert reward_name(Anonymous()) == "Anonymous"


def test_check_texts():
    check_texts(["p", "q"], ["a", "b"], "rm")
    with pytest.raises(TypeError, match="'rm': completions must be a list of strings"):
        check_texts(["p"], "a", "rm")
    with pytest.raises(TypeError, match=r"'rm': prompts\[1\] is a int"):
        check_texts(["p", 3], ["a", "b"], "rm")
    with pytest.raises(ValueError, match="'rm': got 1 prompts and 2 completions"):
        check_texts(["p"], ["a", "b"], "rm")
