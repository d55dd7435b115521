"""Errors a user can cause in models, rewards, data length and caches: each is a tether error
(a ``TetherError`` subclass) whose message names the file, row, option, reward or sample.

One case per fault, on the tiny random model in ``tmp_path``; nothing touches the network.
"""

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tether.data import DataError, load_prompt_dataset
from tether.data.collate import pad_sequences
from tether.errors import CheckpointError, ModelError, TetherError, TetherWarning
from tether.models import load_policy, tiny_causal_lm
from tether.models.loading import ModelNotFoundError, check_generation_fits, model_context_length
from tether.reference import CopyReference, PrecomputedReference
from tether.rewards import RewardError, RewardImportError, call_reward, make_reward
from tether.rewards.model import RewardModel, load_reward_model
from tether.runs.config import ConfigError

SELF = "tests.reliability.test_inputs"


# -- reward functions the cases name by spec ------------------------------------------------------


def fails_on_say_3(prompts, completions):
    """Scores every sample but raises on the prompt 'Say 3:' (row 3 of the prompt file)."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        if "Say 3:" in p:
            raise ZeroDivisionError(f"cannot score {c[:5]!r}")
        out.append(float(len(c)))
    return out


def fails_on_batches(prompts, completions):
    """Fails on any batch of more than one sample: each sample alone scores."""
    if len(completions) > 1:
        raise RuntimeError("batch too large for this scorer")
    return [1.0]


def returns_a_string(prompts, completions):
    return "high"


def returns_nan_for_the_second(prompts, completions):
    return [float("nan") if i == 1 else 0.0 for i in range(len(completions))]


NOT_CALLABLE = 3


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_dir, tmp_path):
    """A fresh copy of the saved tiny model, to break."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


@pytest.fixture(scope="module")
def rm_dir(tiny_dir, tmp_path_factory):
    """A saved reward model on the tiny backbone."""
    path = tmp_path_factory.mktemp("rm") / "rm"
    torch.manual_seed(0)
    RewardModel.from_pretrained_backbone(tiny_dir, dtype="float32", max_length=48).save(path)
    return path


@pytest.fixture
def rm_copy(rm_dir, tmp_path):
    return Path(shutil.copytree(rm_dir, tmp_path / "rm"))


@pytest.fixture(scope="module")
def short_context_dir(tmp_path_factory):
    """The tiny model with a context of 64 positions."""
    path = tmp_path_factory.mktemp("ctx64")
    pol = tiny_causal_lm(seed=0, max_position_embeddings=64)
    pol.model.save_pretrained(path)
    pol.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Say {i}:"}) for i in range(8)))
    return path


@pytest.fixture
def long_pairs(tmp_path):
    """Preference pairs; row 2's prompt + chosen (50 + 31 tokens) exceeds 64 positions."""
    rows = [{"prompt": f"Q{i}:", "chosen": " good", "rejected": " bad"} for i in range(6)]
    rows[2] = {"prompt": "P" * 50, "chosen": " good" * 6, "rejected": " bad"}
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _raises(kind: type[TetherError], *patterns: str) -> Callable:
    """Check ``fn()`` raises ``kind`` (a TetherError) whose message matches every pattern."""

    def check(fn: Callable) -> TetherError:
        assert issubclass(kind, TetherError)
        with pytest.raises(kind) as info:
            fn()
        message = str(info.value)
        for p in patterns:
            assert re.search(p, message), f"{p!r} not in {message!r}"
        return info.value

    return check


# -- 1. model and tokenizer directories -----------------------------------------------------------


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _drop_tokenizer(d: Path) -> None:
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()


MODEL_FAULTS = {
    # name: (break the copy and return what to load, exception, patterns)
    "missing path": (
        lambda d: d / "no-such-model",
        ModelNotFoundError,
        [r"no-such-model", r"no such file or directory", r"not an embedded model"],
    ),
    "file not directory": (
        lambda d: d / "config.json",
        ModelError,
        [r"config\.json is a file, expected a model directory"],
    ),
    "no tokenizer files": (
        lambda d: (_drop_tokenizer(d), d)[1],
        ModelError,
        [r"/model has a config but no tokenizer files", r"tokenizer\.save_pretrained"],
    ),
    "no config.json": (
        lambda d: ((d / "config.json").unlink(), d)[1],
        ModelError,
        [r"/model has no config\.json"],
    ),
    "garbled config.json": (
        lambda d: ((d / "config.json").write_text('{"model_type": "llama",'), d)[1],
        ModelError,
        [r"/model/config\.json is not valid JSON \(line 1", r"corrupt or truncated"],
    ),
    "config.json not an object": (
        lambda d: ((d / "config.json").write_text("[1, 2]"), d)[1],
        ModelError,
        [r"config\.json holds a JSON list"],
    ),
    "unknown model type": (
        lambda d: ((d / "config.json").write_text('{"model_type": "nosuchmodel"}'), d)[1],
        ModelError,
        [r"/model", r"nosuchmodel"],
    ),
    "truncated safetensors": (
        lambda d: (_truncate(d / "model.safetensors"), d)[1],
        ModelError,
        [r"truncated or corrupt weights file \S*/model/model\.safetensors", r"again"],
    ),
    "garbage safetensors": (
        lambda d: ((d / "model.safetensors").write_bytes(b"not a safetensors file"), d)[1],
        ModelError,
        [r"corrupt weights file \S*/model\.safetensors"],
    ),
    "no weights": (
        lambda d: ((d / "model.safetensors").unlink(), d)[1],
        ModelError,
        [r"/model has no weights file"],
    ),
}


@pytest.mark.parametrize("fault", list(MODEL_FAULTS))
def test_model_directory_faults(fault, model_copy):
    breaks, kind, patterns = MODEL_FAULTS[fault]
    target = breaks(model_copy)
    error = _raises(kind, r"could not load model", *patterns)(lambda: load_policy(target))
    if fault not in (
        "missing path",
        "file not directory",
        "no config.json",
        "config.json not an object",
    ):
        assert error.__cause__ is not None  # the library's error is chained


def test_hub_id_not_cached_while_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    _raises(
        ModelNotFoundError,
        r"'tether-tests/no-such-model'",
        r"not in the Hugging Face cache",
        r"HF_HUB_OFFLINE",
    )(lambda: load_policy("tether-tests/no-such-model"))


def test_trust_remote_code_is_off_by_default():
    import inspect

    for fn in (load_policy, RewardModel.from_pretrained_backbone):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False


# -- 1b. reward specs and reward-model directories ------------------------------------------------


def _rm_meta(d: Path, **changes) -> Path:
    meta = json.loads((d / "reward_model.json").read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    (d / "reward_model.json").write_text(json.dumps(meta))
    return d


REWARD_MODEL_FAULTS = {
    "plain model directory": (
        lambda rm, model: model,
        ModelNotFoundError,
        [r"/model is not a tether reward model directory", r"config\.json", r"train reward"],
    ),
    "garbled reward_model.json": (
        lambda rm, model: ((rm / "reward_model.json").write_text('{"format": 1,'), rm)[1],
        ModelError,
        [r"/rm/reward_model\.json is not valid JSON"],
    ),
    "metadata without dtype": (
        lambda rm, model: _rm_meta(rm, dtype=None),
        ModelError,
        [r"/rm/reward_model\.json has no 'dtype' field"],
    ),
    "missing head": (
        lambda rm, model: ((rm / "reward_head.safetensors").unlink(), rm)[1],
        ModelError,
        [r"/rm", r"no reward_head\.safetensors"],
    ),
    "truncated head": (
        lambda rm, model: (_truncate(rm / "reward_head.safetensors"), rm)[1],
        ModelError,
        [r"/rm/reward_head\.safetensors is truncated or corrupt"],
    ),
    "truncated backbone": (
        lambda rm, model: (_truncate(rm / "model.safetensors"), rm)[1],
        ModelError,
        [r"could not load reward model", r"/rm/model\.safetensors"],
    ),
}


@pytest.mark.parametrize("fault", list(REWARD_MODEL_FAULTS))
def test_reward_model_directory_faults(fault, rm_copy, model_copy):
    breaks, kind, patterns = REWARD_MODEL_FAULTS[fault]
    target = breaks(rm_copy, model_copy)
    _raises(kind, *patterns)(lambda: make_reward(str(target)))
    _raises(kind, *patterns)(lambda: load_reward_model(target))


def _user_module(tmp_path, monkeypatch, source: str) -> str:
    name = f"tether_user_rewards_{abs(hash(source)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


SPEC_FAULTS = {
    "module missing": (
        lambda mod: "tether_no_such_module_xyz:score",
        RewardImportError,
        [r"'tether_no_such_module_xyz:score'", r"cannot import module", r"PYTHONPATH"],
    ),
    "function missing": (
        lambda mod: f"{mod}:scroe",
        ModelError,
        [r":scroe'", r"has no attribute 'scroe'", r"\.py"],
    ),
    "not callable": (
        lambda mod: f"{mod}:NOT_CALLABLE",
        ModelError,
        [r"'NOT_CALLABLE' is a int, not a function"],
    ),
    "module raises on import": (
        lambda mod: f"{mod}_broken:score",
        RewardImportError,
        [r"_broken:score'", r"importing it raised ZeroDivisionError"],
    ),
    "a file, not module:function": (
        lambda mod: "rewards.py",
        ModelError,
        [r"'rewards\.py' is a file", r"'rewards:score'"],
    ),
    "no such reward-model directory": (
        lambda mod: "runs/no-such-rm",
        ModelNotFoundError,
        [r"'runs/no-such-rm'", r"no such reward-model directory"],
    ),
}


@pytest.mark.parametrize("fault", list(SPEC_FAULTS))
def test_reward_spec_faults(fault, tmp_path, monkeypatch):
    mod = _user_module(tmp_path, monkeypatch, "NOT_CALLABLE = 3\ndef score(p, c): return []\n")
    (tmp_path / f"{mod}_broken.py").write_text("x = 1 / 0\ndef score(p, c): return []\n")
    (tmp_path / "rewards.py").write_text("def score(p, c): return []\n")
    monkeypatch.chdir(tmp_path)
    spec, kind, patterns = SPEC_FAULTS[fault]
    _raises(kind, *patterns)(lambda: make_reward(spec(mod)))


# -- 2. reward functions that raise ---------------------------------------------------------------

PROMPTS = [f"Say {i}:" for i in range(5)]
COMPLETIONS = [f"answer number {i}" for i in range(5)]


def test_reward_raising_on_one_sample_is_named():
    error = _raises(
        RewardError,
        rf"reward '{SELF}:fails_on_say_3'",
        r"ZeroDivisionError",
        r"sample 3 of 5",
        r"prompt row 13",
        r"completion: 'answer number 3'",
        r"at step 4",
    )(
        lambda: call_reward(
            fails_on_say_3,
            PROMPTS,
            COMPLETIONS,
            f"{SELF}:fails_on_say_3",
            step=4,
            rows=[10, 11, 12, 13, 14],
        )
    )
    assert isinstance(error.__cause__, ZeroDivisionError)


def test_reward_failing_only_on_batches_says_so():
    _raises(
        RewardError,
        r"reward 'fails_on_batches' raised RuntimeError",
        r"batch of 5 samples at step 0",
        r"depends on the batch",
    )(lambda: call_reward(fails_on_batches, PROMPTS, COMPLETIONS, step=0))


def test_reward_returning_garbage_names_step_and_stage():
    _raises(RewardError, r"'returns_a_string' returned a str", r"in best-of-n at step 2")(
        lambda: call_reward(returns_a_string, PROMPTS, COMPLETIONS, step=2, stage="best-of-n")
    )
    # non-finite rewards stay validate_rewards' business, now with the prompt row
    _raises(RewardError, r"returned nan for sample 1 \(prompt row 7, completion: 'answer")(
        lambda: call_reward(returns_nan_for_the_second, PROMPTS, COMPLETIONS, rows=[6, 7, 8, 9, 10])
    )
    skipped = call_reward(returns_nan_for_the_second, PROMPTS, COMPLETIONS, on_invalid="skip")
    assert skipped.skipped == (1,)


def test_rl_collect_names_reward_step_and_row(tiny_dir, prompts_file):
    from tether.train.ppo import PPOConfig
    from tether.train.rl import collect

    pol = load_policy(tiny_dir)
    spec = f"{SELF}:fails_on_say_3"
    cfg = PPOConfig(
        model=str(tiny_dir),
        prompts=str(prompts_file),
        reward=spec,
        output_dir="unused",
        max_new_tokens=4,
        batch_size=4,
        num_generations=2,
        eval_steps=0,
        mixed_precision="no",
    )
    data = list(load_prompt_dataset(str(prompts_file), pol.tokenizer))[:4]
    ref = CopyReference(pol.model)
    _raises(RewardError, rf"reward '{spec}'", r"sample 6 of 8 \(prompt row 3", r"at step 9")(
        lambda: collect(pol.model, pol.tokenizer, ref, make_reward(spec), data, cfg, step=9)
    )


def test_best_of_n_names_reward_and_prompt():
    from tether.bon import best_of_n
    from tether.models import SamplingConfig

    pol = tiny_causal_lm(seed=0)
    ids = [pol.tokenizer.encode(p) for p in PROMPTS[:4]]
    _raises(RewardError, r"'fails_on_say_3'", r"prompt row 3", r"in best-of-n")(
        lambda: best_of_n(
            pol.model,
            pol.tokenizer,
            ids,
            fails_on_say_3,
            n=2,
            sampling=SamplingConfig(max_new_tokens=3),
            calibration=1,
            prompts=PROMPTS[:4],
            seed=0,
        )
    )


def test_heldout_evaluation_names_gold_reward_step_and_row(tiny_dir, prompts_file):
    from tether.eval.heldout import HeldOutEvaluator
    from tether.train.ppo import PPOConfig

    pol = load_policy(tiny_dir)
    spec = f"{SELF}:fails_on_say_3"
    cfg = PPOConfig(
        model=str(tiny_dir),
        prompts=str(prompts_file),
        reward="length",
        output_dir="unused",
        max_new_tokens=3,
        eval_rewards=[spec],
        eval_num_prompts=4,
        eval_samples_per_prompt=2,
        eval_capability_text=None,
        eval_offtask_prompts=None,
        eval_semantic=False,
    )
    prompts = list(load_prompt_dataset(str(prompts_file), pol.tokenizer))[:4]
    evaluator = HeldOutEvaluator(cfg, pol.tokenizer, prompts, None, None)
    _raises(RewardError, rf"'{spec}'", r"prompt row 3", r"in the held-out evaluation at step 7")(
        lambda: evaluator.evaluate(pol.model, CopyReference(pol.model), 7)
    )


def test_online_dpo_names_the_judge_and_step(tiny_dir, prompts_file, tmp_path):
    from tether.train.online_dpo import OnlineDPOConfig, train

    spec = f"{SELF}:fails_on_say_3"
    cfg = OnlineDPOConfig(
        model=str(tiny_dir),
        prompts=str(prompts_file),
        judge=spec,
        output_dir=str(tmp_path / "run"),
        max_new_tokens=3,
        batch_size=8,  # every prompt, 'Say 3:' included
        max_steps=1,
        eval_steps=0,
        save_steps=0,
        mixed_precision="no",
    )
    _raises(RewardError, rf"reward '{spec}'", r"prompt row 3", r"at step 0")(lambda: train(cfg))


# -- 3. context length ----------------------------------------------------------------------------


def test_context_length_is_read_from_model_and_directory(short_context_dir):
    assert model_context_length(short_context_dir) == 64
    assert model_context_length(tiny_causal_lm().model) == 1024
    assert model_context_length(Path("/no/such/dir")) is None


def test_generation_longer_than_context_names_both_options():
    model = tiny_causal_lm().model  # 1024 positions
    check_generation_fits(model, 976, 48)  # exactly fits
    _raises(
        ConfigError,
        r"max_prompt_length \(1000\) \+ max_new_tokens \(48\) = 1048",
        r"context of 1024 positions",
    )(lambda: check_generation_fits(model, 1000, 48))


def test_preference_split_longer_than_context_names_file_and_row(short_context_dir, long_pairs):
    from tether.train.common import load_preference_split

    tok = load_policy(short_context_dir).tokenizer
    error = _raises(
        DataError,
        r"pairs\.jsonl",
        r"row 2",
        r"prompt \+ chosen is 81 tokens",
        r"context of 64 positions",
        r"max_length=128",
    )(
        lambda: load_preference_split(
            tok, str(long_pairs), None, 0.0, 0, context_length=64, max_length=128
        )
    )
    assert [p.row for p in error.problems] == [2]
    # max_length below the context truncates the row instead: no error
    train, _, _ = load_preference_split(
        tok, str(long_pairs), None, 0.0, 0, context_length=64, max_length=64
    )
    assert len(train) == 6


@pytest.mark.parametrize("trainer", ["dpo", "reward_model"])
def test_trainer_data_longer_than_context(trainer, short_context_dir, long_pairs, tmp_path):
    if trainer == "dpo":
        from tether.train.dpo import DPOConfig as Config
        from tether.train.dpo import split_data
    else:
        from tether.train.reward_model import RewardConfig as Config
        from tether.train.reward_model import split_data
    cfg = Config(
        model=str(short_context_dir),
        train_data=str(long_pairs),
        output_dir=str(tmp_path / "run"),
        max_length=128,
        max_prompt_length=100,
        eval_fraction=0.0,
    )
    tok = load_policy(short_context_dir).tokenizer
    _raises(DataError, r"pairs\.jsonl", r"row 2", r"context of 64")(lambda: split_data(cfg, tok))


# -- 4. the precomputed-reference cache -----------------------------------------------------------

SEQS = [[5, 17, 99, 3, 250], [7, 7, 8], [100, 101, 102, 103]]


def _cache_batches():
    ids, mask = pad_sequences(SEQS, pad_value=259)
    return [{"input_ids": ids, "attention_mask": mask}]


def _corrupt_meta_counts(meta: Path) -> None:
    data = json.loads(meta.read_text())
    data["sequences"] += 1
    meta.write_text(json.dumps(data))


CACHE_FAULTS = {
    "truncated json": lambda table, meta: _truncate(meta),
    "truncated safetensors": lambda table, meta: _truncate(table),
    "metadata does not match the table": lambda table, meta: _corrupt_meta_counts(meta),
    "metadata missing": lambda table, meta: meta.unlink(),
}


@pytest.mark.parametrize("fault", list(CACHE_FAULTS))
def test_corrupt_reference_cache_is_rebuilt_with_a_warning(fault, tmp_path):
    model = tiny_causal_lm(seed=4).model
    good = PrecomputedReference.build(model, _cache_batches(), tmp_path, data_fingerprint="d")
    ids, mask = pad_sequences(SEQS, pad_value=259)
    want = good.logprobs(ids, mask).logprobs
    table, meta = good.path, good.path.with_suffix(".json")
    CACHE_FAULTS[fault](table, meta)
    bad = meta if fault in ("truncated json", "metadata does not match the table") else table
    with pytest.warns(TetherWarning, match=re.escape(str(bad)) + r".*rebuilding it"):
        again = PrecomputedReference.build(model, _cache_batches(), tmp_path, data_fingerprint="d")
    torch.testing.assert_close(again.logprobs(ids, mask).logprobs, want, atol=0, rtol=0)
    assert again.meta == good.meta
    # the rebuilt entry is whole again: the next run loads it silently
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PrecomputedReference.build(model, _cache_batches(), tmp_path, data_fingerprint="d")


def test_loading_a_truncated_cache_directly_names_the_file(tmp_path):
    model = tiny_causal_lm(seed=4).model
    ref = PrecomputedReference.build(model, _cache_batches(), tmp_path, data_fingerprint="d")
    _truncate(ref.path)
    _raises(CheckpointError, re.escape(str(ref.path)), r"truncated or unreadable")(
        lambda: PrecomputedReference(ref.path)
    )
