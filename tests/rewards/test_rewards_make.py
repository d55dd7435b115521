"""make_reward: built-ins, saved reward models and user functions by spec."""

import pytest
import torch

from tether.models import tiny_causal_lm
from tether.rewards import BUILTIN_REWARDS, Length, VaderSentiment, make_reward
from tether.rewards.model import RewardModel

USER_MODULE = """
def score(prompts, completions):
    return [float(len(p) + len(c)) for p, c in zip(prompts, completions)]

class Scorer:
    @staticmethod
    def score(prompts, completions):
        return [1.0] * len(completions)

NOT_CALLABLE = 3
"""


def test_builtins():
    assert set(BUILTIN_REWARDS) == {"vader", "length", "textblob", "afinn"}
    assert isinstance(make_reward("vader"), VaderSentiment)
    assert isinstance(make_reward("length"), Length)
    assert make_reward("vader") is not make_reward("vader")  # a fresh one each time


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "tether_test_user_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tether_test_user_rewards"


def test_module_function(user_module):
    fn = make_reward(f"{user_module}:score")
    assert fn(["ab", "c"], ["x", ""]) == [3.0, 1.0]
    assert make_reward(f"{user_module}:Scorer.score")(["p"], ["c"]) == [1.0]


def test_module_function_errors(user_module):
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_xyz'"):
        make_reward("no_such_module_xyz:score")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        make_reward(f"{user_module}:missing")
    with pytest.raises(ValueError, match="'NOT_CALLABLE' is a int, not a function"):
        make_reward(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="both parts non-empty"):
        make_reward(f"{user_module}:")


def test_reward_model_directory(tmp_path):
    backbone = tmp_path / "backbone"
    policy = tiny_causal_lm(seed=0)
    policy.model.save_pretrained(backbone)
    policy.tokenizer.save_pretrained(backbone)
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained_backbone(backbone, dtype="float32", max_length=48)
    rm.save(tmp_path / "rm")
    loaded = make_reward(str(tmp_path / "rm"))
    prompts, completions = ["Review: ", "Review: "], ["great film", "awful film"]
    assert loaded(prompts, completions) == pytest.approx(rm.score(prompts, completions), abs=1e-6)


def test_unknown_spec_lists_builtins(tmp_path):
    builtins = r"\(afinn, length, textblob, vader\)"
    with pytest.raises(ValueError, match=r"unknown reward 'sentiment'.*" + builtins):
        make_reward("sentiment")
    with pytest.raises(ValueError, match="non-empty string"):
        make_reward("")
    with pytest.raises(FileNotFoundError, match="not a tether reward model directory"):
        make_reward(str(tmp_path))


def test_gold_lexicons_hand_values():
    """TextBlob's polarity is the mean of its phrases' polarities (so repeating a positive word
    does not raise it, unlike VADER's squashed sum); AFINN is valence per word / 5."""
    from afinn import Afinn
    from textblob import TextBlob

    texts = ["good", "good good good", "The plot was dull and the acting poor.", ""]
    tb = make_reward("textblob")([""] * 4, texts)
    assert tb[0] == pytest.approx(tb[1]) and tb[0] == TextBlob("good").sentiment.polarity > 0
    assert tb[2] == TextBlob(texts[2]).sentiment.polarity < 0 and tb[3] == 0.0
    af = make_reward("afinn")([""] * 4, texts)
    good = Afinn().score("good")
    assert af[0] == pytest.approx(good / 5) and af[1] == pytest.approx(3 * good / (5 * 3))
    assert af[2] == pytest.approx(Afinn().score(texts[2]) / (5 * 8)) and af[3] == 0.0
    vader = make_reward("vader")([""] * 2, texts[:2])
    assert vader[1] > vader[0]  # VADER's sum grows with repetition
