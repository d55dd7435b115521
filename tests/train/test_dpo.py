"""Offline DPO on the tiny model: it learns a toy preference, measures its KL, resumes exactly."""

import json
import random

import pytest
import torch

from tether.runs import read_metrics
from tether.runs.config import load_config
from tether.train.dpo import DPOConfig, sequence_logps, train


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """Chosen responses are upbeat ('good ...'), rejected ones 'bad ...': learnable from tokens."""
    rng = random.Random(0)
    words = ["film", "plot", "cast", "story", "scene", "music"]
    rows = []
    for i in range(80):
        w = rng.choice(words)
        rows.append(
            {
                "prompt": f"Review {i}: the {w} was",
                "chosen": f" good, {rng.choice(words)} good",
                "rejected": f" bad, {rng.choice(words)} bad",
            }
        )
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _cfg(tiny_dir, prefs, out, **kw):
    base = dict(
        model=str(tiny_dir),
        train_data=str(prefs),
        output_dir=str(out),
        learning_rate=3e-3,
        lr_scheduler="constant",
        batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=24,
        logging_steps=4,
        eval_steps=12,
        save_steps=12,
        beta=0.5,
        max_length=64,
        max_prompt_length=32,
        seed=1,
        eval_generate=False,
    )
    base.update(kw)
    return DPOConfig(**base)


def test_sequence_logps():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    m = torch.tensor([[False, True, True], [True, False, False]])
    assert sequence_logps(lp, m, mean=False).tolist() == [-5.0, -4.0]
    assert sequence_logps(lp, m, mean=True).tolist() == [-2.5, -4.0]


@pytest.mark.parametrize("reference", ["precomputed", "copy"])
def test_dpo_learns_the_preference_and_reports_kl(
    tiny_dir, prefs, tmp_path, monkeypatch, reference
):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tiny_dir, prefs, tmp_path / "run", reference=reference, logging_steps=1)
    final = train(cfg)
    rows = read_metrics(tmp_path / "run")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert train_rows[0]["loss"] == pytest.approx(0.6931, abs=0.02)  # π = π_ref at the start
    assert train_rows[-1]["loss"] < 0.3
    assert eval_rows[-1]["eval/rewards/accuracy"] >= 0.9
    assert eval_rows[-1]["eval/loss"] < eval_rows[0]["eval/loss"] or eval_rows[0]["eval/loss"] < 0.3
    # KL to the reference grows from 0 and is reported three ways; the exact KL is non-negative
    assert train_rows[-1]["kl/chosen_exact"] > 0
    assert train_rows[-1]["kl/chosen_k3"] > 0
    assert final["rewards/margin"] > 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_resume_equals_uninterrupted(tiny_dir, prefs, tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    full = _cfg(tiny_dir, prefs, tmp_path / "full", max_steps=8, save_steps=4, eval_steps=100)
    train(full)
    half = _cfg(tiny_dir, prefs, tmp_path / "half", max_steps=4, save_steps=4, eval_steps=100)
    train(half)
    resumed = _cfg(
        tiny_dir, prefs, tmp_path / "half", max_steps=8, save_steps=4, eval_steps=100, resume=True
    )
    train(resumed)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "half" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "half") if "loss" in r]
    assert la == lb


def test_lora_with_adapter_reference(tiny_dir, prefs, tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(
        tiny_dir,
        prefs,
        tmp_path / "lora",
        reference="adapter",
        peft={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "up_proj"]},
        learning_rate=1e-2,
        max_steps=16,
    )
    train(cfg)
    rows = [r for r in read_metrics(tmp_path / "lora") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert (tmp_path / "lora" / "final" / "adapter_config.json").is_file()


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0.0)
    y = tmp_path / "r.yaml"
    y.write_text("loss_type: kto\n")
    with pytest.raises(ValueError, match="loss_type"):
        load_config(DPOConfig, y)
    with pytest.raises(ValueError, match="train_data is required"):
        train(DPOConfig(output_dir=str(tmp_path / "x"), model=str(tmp_path)))


def test_precomputed_reference_shows_progress_once(tiny_dir, prefs, tmp_path, monkeypatch, capsys):
    """Building the reference cache over the whole dataset is a long silent stage on a real
    model: it prints plain progress lines (stdout is not a terminal here); a cache hit prints
    none."""
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tiny_dir, prefs, tmp_path / "run", reference="precomputed", max_steps=1)
    train(cfg)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("reference log-probs step")]
    assert lines and lines[-1].startswith("reference log-probs step ") and "pairs" in lines[-1]
    done, total = lines[-1].split()[3].split("/")
    assert done == total and 1 <= len(lines) <= 11
    train(_cfg(tiny_dir, prefs, tmp_path / "run2", reference="precomputed", max_steps=1))
    assert "reference log-probs step" not in capsys.readouterr().out
