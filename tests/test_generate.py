"""tether generate: rows, rewards, and the KL to a reference against direct computations."""

import json
import math
import shutil

import pytest
import torch

from tests.helpers.rewards import vowel_fraction
from tests.helpers.runs import REWARD, make_run, save_tiny, write_prompts
from tether.cli import main
from tether.data import load_prompt_dataset
from tether.generate import NamedReward, generate_rows, mean_stderr, summarize
from tether.models import SamplingConfig, load_policy
from tether.trained import model_reference

SE_TOLERANCE = 4.0
"""Monte-Carlo checks allow this many standard errors."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    return {
        "a": save_tiny(root / "a", seed=0),
        "b": save_tiny(root / "b", seed=1),
        "prompts": write_prompts(root / "prompts.jsonl", 8),
        "root": root,
    }


def _examples(policy, prompts, k=None):
    return list(load_prompt_dataset(str(prompts), policy.tokenizer))[:k]


def test_cli_writes_one_row_per_response_with_rewards_and_kl(files, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    args = ["generate", str(files["a"]), "--prompts", str(files["prompts"]), "--n", "2"]
    args += ["--limit", "3", "--reward", REWARD, "--reward", "length"]
    args += ["--reference", str(files["b"]), "--max-new-tokens", "6", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [
        (i, j) for i in range(3) for j in range(2)
    ]
    assert rows[0]["prompt"] == "Say 0:" and rows[5]["prompt"] == "Say 2:"
    for r in rows:
        assert set(r) == {
            "prompt_index",
            "sample_index",
            "prompt",
            "response",
            "n_tokens",
            "finished",
            "rewards",
            "kl",
            "response_ids",
        }
        assert r["n_tokens"] == len(r["response_ids"]) <= 6
        # the recorded rewards are the reward functions of the recorded responses
        assert r["rewards"]["vowel_fraction"] == vowel_fraction([], [r["response"]])[0]
        assert r["rewards"]["length"] == pytest.approx(len(r["response"]) / 100)
        assert set(r["kl"]) == {"exact", "k1", "k3"} and r["kl"]["exact"] > 0
    captured = capsys.readouterr()
    printed = captured.out
    # without a terminal, progress is one plain line per batch, before the summary
    assert printed.splitlines()[0].startswith("generate step 6/6")
    mean_exact = sum(r["kl"]["exact"] for r in rows) / 6
    line = next(x for x in printed.splitlines() if "kl/exact" in x)
    assert f"{mean_exact:.4f} ±" in line
    # --reference none: no KL
    assert main([*args[:-4], "--reference", "none", "--out", str(out)]) == 0
    assert "kl" not in json.loads(out.read_text().splitlines()[0])


def test_exact_kl_of_a_model_to_itself_is_zero(files):
    pol = load_policy(str(files["a"]), dtype="float32")
    rows = generate_rows(
        pol.model,
        pol.tokenizer,
        _examples(pol, files["prompts"], 4),
        SamplingConfig(max_new_tokens=6, temperature=0.7),
        n=2,
        reference=model_reference(load_policy(str(files["a"]), dtype="float32").model),
    )
    for r in rows:
        assert r["kl"] == {"exact": 0.0, "k1": 0.0, "k3": 0.0}


def _direct_kl(policy, ref_model, prompt_ids, response_ids, temperature):
    """Σ over response positions of KL(π‖π_ref) over the vocabulary, and Σ log π − log π_ref of
    the sampled tokens: plain forwards in float64, no tether code."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    p = len(prompt_ids)
    with torch.no_grad():
        lp = torch.log_softmax(policy.model.double()(ids).logits[0] / temperature, -1)
        lq = torch.log_softmax(ref_model.double()(ids).logits[0] / temperature, -1)
    policy.model.float(), ref_model.float()
    lp, lq = lp[p - 1 : -1], lq[p - 1 : -1]  # position t predicts token t + 1
    exact = float((lp.exp() * (lp - lq)).sum())
    tok = torch.tensor(response_ids)
    k1 = float((lp[range(len(tok)), tok] - lq[range(len(tok)), tok]).sum())
    return exact, k1


def test_exact_and_k1_match_a_direct_computation(files):
    pol = load_policy(str(files["a"]), dtype="float32")
    ref = load_policy(str(files["b"]), dtype="float32").model
    examples = _examples(pol, files["prompts"], 3)
    temperature = 0.5
    rows = generate_rows(
        pol.model,
        pol.tokenizer,
        examples,
        SamplingConfig(max_new_tokens=6, temperature=temperature),
        n=2,
        reference=model_reference(ref),
        batch_size=4,
    )
    by_index = {e.index: e for e in examples}
    for r in rows:
        exact, k1 = _direct_kl(
            pol, ref, by_index[r["prompt_index"]].prompt_ids, r["response_ids"], temperature
        )
        assert exact > 0.05
        assert r["kl"]["exact"] == pytest.approx(exact, rel=1e-4, abs=1e-6)
        assert r["kl"]["k1"] == pytest.approx(k1, rel=1e-4, abs=1e-5)


def test_responses_do_not_depend_on_the_batch_size(files):
    pol = load_policy(str(files["a"]), dtype="float32")
    ex = _examples(pol, files["prompts"], 3)
    sampling = SamplingConfig(max_new_tokens=5)
    one = generate_rows(pol.model, pol.tokenizer, ex, sampling, n=2, batch_size=1, seed=3)
    six = generate_rows(pol.model, pol.tokenizer, ex, sampling, n=2, batch_size=6, seed=3)
    assert [r["response_ids"] for r in one] == [r["response_ids"] for r in six]


def test_k1_and_k3_means_agree_with_the_exact_kl(files):
    """Over y ∼ π the three estimators have the same mean (the sequence KL): the paired
    differences average to 0 within a few standard errors, on enough samples that the
    tolerance is a small fraction of the KL itself."""
    pol = load_policy(str(files["a"]), dtype="float32")
    ref = load_policy(str(files["b"]), dtype="float32").model
    rows = generate_rows(
        pol.model,
        pol.tokenizer,
        _examples(pol, files["prompts"], 4),
        SamplingConfig(max_new_tokens=6, temperature=0.5),
        n=150,
        reference=model_reference(ref),
        batch_size=150,
        seed=1,
    )
    exact = mean_stderr([r["kl"]["exact"] for r in rows])
    for est in ("k1", "k3"):
        diff = mean_stderr([r["kl"][est] - r["kl"]["exact"] for r in rows])
        assert diff.stderr < 0.15 * exact.mean  # the check can fail
        assert abs(diff.mean) < SE_TOLERANCE * diff.stderr, (est, diff, exact)
    stats = summarize(rows)
    assert stats["kl/exact"].count == 600
    assert stats["kl/exact"].stderr < stats["kl/k1"].stderr  # exact has the least variance


def test_rewards_are_recorded_per_response(files):
    pol = load_policy(str(files["a"]), dtype="float32")
    rows = generate_rows(
        pol.model,
        pol.tokenizer,
        _examples(pol, files["prompts"], 2),
        SamplingConfig(max_new_tokens=6),
        n=3,
        rewards=[NamedReward("vf", REWARD, vowel_fraction)],
    )
    assert [r["rewards"]["vf"] for r in rows] == vowel_fraction([], [r["response"] for r in rows])
    stats = summarize(rows)
    values = [r["rewards"]["vf"] for r in rows]
    assert stats["reward/vf"].mean == pytest.approx(sum(values) / 6)
    assert "kl/exact" not in stats


def test_mean_stderr_by_hand():
    s = mean_stderr([1.0, 2.0, 3.0, 6.0])
    assert s.mean == 3.0 and s.count == 4
    assert s.stderr == pytest.approx(math.sqrt((4 + 1 + 0 + 9) / 3 / 4), abs=1e-15)
    assert math.isnan(mean_stderr([1.0]).stderr)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("lora"))


def test_a_lora_run_defaults_to_its_final_and_its_base_as_reference(lora_run, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    args = ["generate", str(lora_run), "--prompts", str(lora_run.parent / "prompts.jsonl")]
    args += ["--limit", "2"]
    assert main([*args, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2
    assert set(rows[0]["rewards"]) == {"vowel_fraction"}  # the run's reward
    assert rows[0]["n_tokens"] <= 6  # the run's max_new_tokens
    assert all(r["kl"]["exact"] > 0 for r in rows)  # the adapter moved the model
    assert "(the adapter disabled)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompts", "missing.jsonl"], "--prompts: 'missing.jsonl' not found"),
        (["--checkpoint", "step-99"], "has no checkpoint 'step-99'"),
        (["--checkpoint", "bogus"], "expected final, best, latest or step-N"),
        (["--n", "0"], "--n must be ≥ 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(lora_run, capsys, extra, message):
    args = ["generate", str(lora_run), "--prompts", str(lora_run.parent / "prompts.jsonl"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("tether generate: error:") and len(err.strip().splitlines()) == 1


def test_a_run_without_final_is_an_error(tmp_path, capsys):
    run = make_run(tmp_path)
    shutil.rmtree(run / "final")
    capsys.readouterr()
    assert main(["generate", str(run), "--prompts", str(tmp_path / "prompts.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "final not found" in err and "step-000001, step-000002" in err
    assert len(err.strip().splitlines()) == 1
