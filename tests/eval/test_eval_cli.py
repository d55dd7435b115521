"""tether eval: the held-out evaluation of a saved model, checked against its own samples."""

import json
import math

import pytest

from tests.helpers.rewards import lowercase_fraction, vowel_fraction
from tests.helpers.runs import make_run, save_tiny, write_prompts
from tether.cli import main

FAST = ["--no-semantic", "--capability-text", "none", "--offtask-prompts", "none"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("lora"))


def _read(out):
    data = json.loads(out.read_text())
    samples = [json.loads(x) for x in open(data["samples"], encoding="utf-8")]
    return data, samples


def test_eval_of_a_run_writes_its_metrics_and_samples(lora_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    gold = "tests.helpers.rewards:lowercase_fraction"
    args = ["eval", str(lora_run), "--eval-reward", gold, "--samples-per-prompt", "3"]
    assert main([*args, *FAST, "--out", str(out)]) == 0
    data, samples = _read(out)
    assert data["checkpoint"] == "final" and data["step"] == 2
    assert data["proxy"] == "tests.helpers.rewards:vowel_fraction"  # the run's reward
    assert data["reference"].endswith("(the adapter disabled)")
    # the run's held-out prompts: eval_num_prompts=4 of its 12, × 3 samples
    assert len(samples) == 12 and len({s["prompt_index"] for s in samples}) == 4
    m = data["metrics"]
    # each metric recomputed from the samples it was measured on
    completions = [s["completion"] for s in samples]
    assert m["eval/proxy"] == pytest.approx(sum(vowel_fraction([], completions)) / 12)
    gold_values = lowercase_fraction([], completions)
    assert m["eval/gold/lowercase_fraction"] == pytest.approx(sum(gold_values) / 12)
    for est in ("exact", "k1", "k3"):
        assert m[f"eval/kl/{est}"] == pytest.approx(sum(s["kl"][est] for s in samples) / 12)
    assert m["eval/kl/exact"] > 0
    lengths = [len(s["token_ids"]) for s in samples]
    assert m["eval/response_length"] == pytest.approx(sum(lengths) / 12)
    assert all(n <= 6 for n in lengths)  # the run's max_new_tokens
    assert "eval/proxy_gold_gap" not in m and "eval/nll" not in m
    printed = capsys.readouterr().out
    assert "kl/exact" in printed and str(out) in printed


def test_eval_of_a_model_against_itself_has_zero_kl(tmp_path):
    model = save_tiny(tmp_path / "m")
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "e.json"
    args = ["eval", str(model), "--prompts", str(prompts), "--reference", str(model)]
    args += ["--samples-per-prompt", "2", "--max-new-tokens", "5", "--reward", "length"]
    args += ["--no-semantic", "--offtask-prompts", "none", "--out", str(out)]
    assert main(args) == 0
    data, samples = _read(out)
    m = data["metrics"]
    assert len(samples) == 6  # every prompt of --prompts
    assert m["eval/kl/exact"] == 0.0 and m["eval/kl/k1"] == 0.0
    assert m["eval/nll_tax"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(m["eval/nll"]) and m["eval/nll"] > 0


def test_a_model_without_reference_leaves_the_kl_out(tmp_path):
    model = save_tiny(tmp_path / "m")
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    out = tmp_path / "e.json"
    args = ["eval", str(model), "--prompts", str(prompts), "--samples-per-prompt", "2"]
    assert main([*args, "--max-new-tokens", "4", *FAST, "--out", str(out)]) == 0
    data, _ = _read(out)
    assert data["reference"] is None
    assert not [k for k in data["metrics"] if k.startswith("eval/kl")]
    assert "eval/distinct_1" in data["metrics"]


def test_bad_input_is_one_line_and_exit_2(lora_run, tmp_path, capsys):
    for args, message in [
        (["--prompts", "nope.jsonl"], "--prompts: 'nope.jsonl' not found"),
        (["--checkpoint", "step-5"], "has no checkpoint 'step-5'"),
        (["--samples-per-prompt", "0"], "eval_samples_per_prompt must be ≥ 1"),
    ]:
        assert main(["eval", str(lora_run), *args, "--out", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        assert err.startswith("tether eval: error:") and len(err.strip().splitlines()) == 1
    assert main(["eval", str(tmp_path / "m"), "--out", str(tmp_path / "x.json")]) == 2
    assert "--prompts is required" in capsys.readouterr().err
