"""Held-out evaluation: the pure pieces against hand values, and the evaluator inside the RL,
online-DPO and offline-DPO trainers on the tiny model (eval/ metrics, samples/, report, a planted
gold that disagrees with the proxy, early stopping, the training RNG left alone)."""

import json
import math

import pytest
import torch

from tether.eval.heldout import (
    EvalConfig,
    diversity_metrics,
    mean_std,
    overoptimising,
    reward_names,
    slope,
    split_eval_prompts,
    standardised_gap,
)
from tether.runs import read_metrics

PROXY = "tests.helpers.rewards:uppercase_fraction"
GOLD = "tests.helpers.rewards:negated_uppercase_fraction"


# -- pure pieces ----------------------------------------------------------------------------------


def test_standardised_gap_hand_values():
    # proxy up 0.3 with step-0 σ 0.1 (+3σ); gold down 0.2 with σ 0.4 (−0.5σ): gap 3.5
    assert standardised_gap(0.5, 0.8, (0.2, 0.1), (1.0, 0.4)) == pytest.approx(3.5)
    assert standardised_gap(0.2, 1.0, (0.2, 0.1), (1.0, 0.4)) == 0.0  # at step 0
    # a step-0 σ of 0 is replaced by the spread now, and by 1 when that is 0 too
    assert standardised_gap(1.2, 1.0, (0.2, 0.0), (1.0, 0.0), (0.5, 0.0)) == pytest.approx(2.0)
    assert standardised_gap(1.2, 1.0, (0.2, 0.0), (1.0, 0.0)) == pytest.approx(1.0)


def test_slope_and_overoptimising():
    assert slope([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert slope([3.0, 1.0, 2.0]) == pytest.approx(-0.5)
    assert slope([5.0]) == 0.0
    assert overoptimising([0.1, 0.2, 0.3], [0.5, 0.4, 0.2], gold_se=0.1)
    assert not overoptimising([0.1, 0.2, 0.3], [0.5, 0.45, 0.4], gold_se=0.1)  # within noise
    assert not overoptimising([0.3, 0.2, 0.1], [0.5, 0.4, 0.2], gold_se=0.1)  # proxy falls too
    assert not overoptimising([0.1, 0.2, 0.3], [0.2, 0.4, 0.5], gold_se=0.1)  # both rise


def test_mean_std_ignores_nan():
    m, s = mean_std([1.0, 3.0, float("nan")])
    assert (m, s) == (2.0, 1.0)
    assert all(math.isnan(v) for v in mean_std([float("nan")]))


def test_reward_names():
    assert reward_names(["vader", "pkg.mod:Scorer.score", "runs/rm/"]) == ["vader", "score", "rm"]
    with pytest.raises(ValueError, match="same metric name"):
        reward_names(["a:score", "b:score"])


def test_diversity_metrics_hand_values():
    # two prompts × two completions; tokens: distinct unigrams {1,2,3,4} of 8 → 0.5
    toks = [[1, 2], [1, 2], [3, 4], [3, 4]]
    m = diversity_metrics(toks, ["a b", "a b", "c d", "c e"], [0, 0, 1, 1], vocab_size=10)
    assert m["distinct_1"] == 0.5 and m["distinct_2"] == 0.5
    assert m["distinct_3"] == 0.0  # no trigram in 2-token texts
    # EAD-1: 4 distinct / E[distinct of 8 uniform draws from 10] = 10·(1 − 0.9^8)
    assert m["ead_1"] == pytest.approx(4 / (10 * (1 - 0.9**8)))
    # EAD-2 counts over the V² = 100 possible bigrams: 2 / (100·(1 − 0.99^4))
    assert m["ead_2"] == pytest.approx(2 / (100 * (1 - 0.99**4)))
    # self-BLEU: identical pair → 1; the other pair shares one of two words
    import sacrebleu

    other = sacrebleu.sentence_bleu("c d", ["c e"]).score / 100
    other = (other + sacrebleu.sentence_bleu("c e", ["c d"]).score / 100) / 2
    assert m["self_bleu"] == pytest.approx((1.0 + other) / 2)


def test_split_eval_prompts_is_seeded_and_leaves_a_batch():
    items = list(range(20))
    train, held = split_eval_prompts(items, 4, seed=3, min_train=8)
    assert len(held) == 4 and sorted(train + held) == items
    assert split_eval_prompts(items, 4, seed=3, min_train=8) == (train, held)
    assert split_eval_prompts(items, 4, seed=4, min_train=8)[1] != held
    with pytest.raises(ValueError, match="fewer than one global batch"):
        split_eval_prompts(items, 16, seed=3, min_train=8)


def test_config_checks():
    from tether.train.ppo import PPOConfig

    with pytest.raises(ValueError, match="early_stop_on must name an eval metric"):
        PPOConfig(early_stop_on="score")
    with pytest.raises(ValueError, match="needs held-out evaluation"):
        PPOConfig(early_stop_on="eval/proxy", eval_steps=0)
    with pytest.raises(ValueError, match="eval_samples_per_prompt must be ≥ 1"):
        PPOConfig(eval_samples_per_prompt=0)
    assert issubclass(PPOConfig, EvalConfig)


def test_builtin_data_ships_and_covers_topics():
    from tether.eval.heldout import BUILTIN_TEXT, builtin_data, load_texts

    texts = load_texts(BUILTIN_TEXT, 96)
    assert len(texts) == 96
    rows = [json.loads(x) for x in builtin_data("general_text.jsonl").read_text().splitlines()]
    assert len(rows) >= 300 and len({r["topic"] for r in rows[:96]}) == 32
    assert len(builtin_data("offtask_prompts.jsonl").read_text().splitlines()) >= 32


def test_load_texts_names_the_bad_row(tmp_path):
    from tether.data.errors import DataError
    from tether.eval.heldout import load_texts

    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl[\s\S]*line 2[\s\S]*text"):
        load_texts(str(path), 10)


# -- inside the trainers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    (d / "p.jsonl").write_text("\n".join(json.dumps({"prompt": f"Say {i}:"}) for i in range(40)))
    (d / "t.jsonl").write_text(
        "\n".join(json.dumps({"text": f"Passage {i} is about rivers and hills."}) for i in range(6))
    )
    return d


def _eval_kw(files, **kw):
    base = dict(
        eval_num_prompts=8,
        eval_samples_per_prompt=4,
        eval_rewards=[GOLD],
        eval_capability_text=str(files / "t.jsonl"),
        eval_offtask_prompts=str(files / "p.jsonl"),
        eval_offtask_num=4,
        eval_semantic=False,
    )
    base.update(kw)
    return base


def _rl_cfg(tiny_dir, files, out, **kw):
    from tether.train.ppo import PPOConfig

    base = dict(
        model=str(tiny_dir),
        prompts=str(files / "p.jsonl"),
        reward=PROXY,
        output_dir=str(out),
        max_new_tokens=10,
        learning_rate=3e-3,
        lr_scheduler="constant",
        batch_size=16,
        max_steps=12,
        logging_steps=1,
        save_steps=0,
        seed=0,
        mixed_precision="no",
        kl_coef=0.0,
        eval_steps=4,
        **_eval_kw(files),
    )
    base.update(kw)
    return PPOConfig(**base)


def _evals(out):
    return [r for r in read_metrics(out) if "eval/kl/exact" in r]


@pytest.fixture(scope="module")
def ppo_run(tiny_dir, files, tmp_path_factory):
    from tether.train.ppo import train

    out = tmp_path_factory.mktemp("ppo_eval")
    train(_rl_cfg(tiny_dir, files, out))
    return out


def test_rl_eval_metrics_and_samples(ppo_run, capsys):
    evals = _evals(ppo_run)
    assert [r["step"] for r in evals] == [0, 4, 8, 12]
    first, last = evals[0], evals[-1]
    keys = {
        "eval/proxy",
        "eval/gold/negated_uppercase_fraction",
        "eval/kl/k1",
        "eval/kl/k3",
        "eval/kl/exact",
        "eval/kl/offtask",
        "eval/entropy",
        "eval/self_bleu",
        "eval/nll",
        "eval/ref_nll",
        "eval/nll_tax",
        "eval/proxy_gold_gap",
        "eval/seconds",
    } | {f"eval/{m}_{n}" for m in ("distinct", "ead") for n in (1, 2, 3, 4)}
    assert keys <= first.keys(), keys - first.keys()
    # at step 0 the policy is the reference: every KL and the tax are 0 exactly
    for k in ("eval/kl/k1", "eval/kl/k3", "eval/kl/exact", "eval/kl/offtask", "eval/nll_tax"):
        assert first[k] == pytest.approx(0.0, abs=1e-6), k
    assert first["eval/proxy_gold_gap"] == 0.0
    # β = 0 on the proxy: it climbs, the planted (negated) gold falls, the gap grows
    assert last["eval/proxy"] > first["eval/proxy"]
    assert last["eval/proxy_gold_gap"] > 2.0, [r["eval/proxy_gold_gap"] for r in evals]
    assert last["eval/kl/exact"] > 0.05 and last["eval/nll_tax"] > 0
    # the ref NLL is the same at every evaluation (a frozen reference)
    assert len({r["eval/ref_nll"] for r in evals}) == 1

    files = sorted((ppo_run / "samples").glob("step-*.jsonl"))
    assert [f.name for f in files] == [f"step-{s:06d}.jsonl" for s in (0, 4, 8, 12)]
    rows = [json.loads(x) for x in files[-1].read_text().splitlines()]
    assert len(rows) == 8 * 4
    r = rows[0]
    assert set(r["rewards"]) == {"proxy", "negated_uppercase_fraction"}
    assert r["rewards"]["negated_uppercase_fraction"] == pytest.approx(-r["rewards"]["proxy"])
    n = len(r["tokens"])
    assert len(r["logp"]) == len(r["ref_logp"]) == len(r["token_kl"]) == n > 0
    assert "".join(r["tokens"]) == r["completion"] or n > 0
    # per-token exact KL sums to the response's exact KL; log-ratios give k1
    assert sum(r["token_kl"]) == pytest.approx(r["kl"]["exact"], abs=1e-3)
    assert sum(a - b for a, b in zip(r["logp"], r["ref_logp"], strict=True)) == pytest.approx(
        r["kl"]["k1"], abs=1e-3
    )
    # the mean over samples is the logged metric
    assert sum(x["kl"]["exact"] for x in rows) / len(rows) == pytest.approx(
        evals[-1]["eval/kl/exact"], rel=1e-4, abs=1e-6
    )


def test_report_of_a_real_eval_run(ppo_run, tmp_path):
    """The report of a trainer's run: every eval chart, and the tokens of the last step's samples
    with their log-probs and exact KL in the tooltip."""
    import html

    from tether.eval.report import write_report

    out = write_report([ppo_run], out=tmp_path / "r.html")
    text = out.read_text()
    assert "Proxy vs gold" in text and text.count("<svg") >= 6
    assert "https://" not in text and "http://" not in text
    last = json.loads((ppo_run / "samples" / "step-000012.jsonl").read_text().splitlines()[0])
    tip = (
        f"log π = {last['logp'][0]:.2f}, log π_ref = {last['ref_logp'][0]:.2f}, "
        f"KL = {last['token_kl'][0]:.2f}"
    )
    assert html.escape(tip) in text or tip in text


def _check_report(run):
    from tether.eval.report import write_report

    text = write_report([run]).read_text()
    assert (run / "report.html").is_file() and "Proxy vs gold" in text and "log π_ref = " in text


def test_rl_warns_once_when_proxy_rises_and_gold_falls(tiny_dir, files, tmp_path, capsys):
    from tether.train.ppo import train

    train(_rl_cfg(tiny_dir, files, tmp_path, max_steps=9, eval_steps=3, overopt_window=3))
    captured = capsys.readouterr()
    out = captured.out
    assert out.count("tether: over-optimisation") == 1, out
    assert "tether: over-optimisation" not in captured.err  # not printed twice
    assert "negated_uppercase_fraction fell" in out


def test_eval_leaves_the_training_rng_alone(tiny_dir, files, tmp_path):
    """A run evaluating after every step trains exactly as one evaluating only at the start
    and the end: eval sampling draws from a forked RNG with its own seed (so a resumed run
    stays bit-identical too)."""
    from tether.train.ppo import train

    train(_rl_cfg(tiny_dir, files, tmp_path / "every", max_steps=3, eval_steps=1))
    train(_rl_cfg(tiny_dir, files, tmp_path / "ends", max_steps=3, eval_steps=1000))
    assert [r["step"] for r in _evals(tmp_path / "ends")] == [0, 3]
    every = [r for r in read_metrics(tmp_path / "every") if "score" in r]
    ends = [r for r in read_metrics(tmp_path / "ends") if "score" in r]
    for a, b in zip(every, ends, strict=True):
        assert a["score"] == b["score"] and a["kl/k1"] == b["kl/k1"]


def test_early_stop_keeps_the_best_policy(tiny_dir, files, tmp_path):
    from tether.train.ppo import train

    out = tmp_path / "es"
    cfg = _rl_cfg(
        tiny_dir,
        files,
        out,
        max_steps=40,
        eval_steps=2,
        early_stop_on="eval/gold/negated_uppercase_fraction",
        early_stop_patience=2,
    )
    train(cfg)
    evals = _evals(out)
    assert evals[-1]["step"] < 40  # stopped early
    best = json.loads((out / "best" / "best.json").read_text())
    gold = {r["step"]: r["eval/gold/negated_uppercase_fraction"] for r in evals}
    assert best["value"] == max(gold.values()) and gold[best["step"]] == best["value"]
    # patience: the last 2 evaluations did not improve on the best
    assert best["step"] == evals[-3]["step"]
    assert (out / "best" / "config.json").is_file() and (out / "final").is_dir()


def test_resume_continues_the_evaluator(tiny_dir, files, tmp_path):
    from tether.train.ppo import train

    full = tmp_path / "full"
    train(_rl_cfg(tiny_dir, files, full, max_steps=8, save_steps=4))
    part = tmp_path / "part"
    train(_rl_cfg(tiny_dir, files, part, max_steps=4, save_steps=4))
    train(_rl_cfg(tiny_dir, files, part, max_steps=8, save_steps=4, resume=True))
    a, b = _evals(full), _evals(part)
    assert [r["step"] for r in b] == [0, 4, 8]
    # the gap after resuming is standardised against the same step-0 baseline
    assert b[-1]["eval/proxy_gold_gap"] == pytest.approx(a[-1]["eval/proxy_gold_gap"], abs=1e-6)


def test_online_dpo_eval(tiny_dir, files, tmp_path):
    from tether.train.online_dpo import OnlineDPOConfig, train

    cfg = OnlineDPOConfig(
        model=str(tiny_dir),
        prompts=str(files / "p.jsonl"),
        judge=PROXY,
        output_dir=str(tmp_path),
        max_new_tokens=12,
        learning_rate=5e-3,
        lr_scheduler="constant",
        batch_size=16,
        beta=0.1,
        max_steps=16,
        logging_steps=4,
        save_steps=0,
        seed=0,
        eval_steps=8,
        **_eval_kw(files),
    )
    train(cfg)
    evals = _evals(tmp_path)
    assert [r["step"] for r in evals] == [0, 8, 16]
    assert evals[0]["eval/kl/exact"] == pytest.approx(0.0, abs=1e-6)
    assert evals[-1]["eval/proxy"] > evals[0]["eval/proxy"]
    assert evals[-1]["eval/proxy_gold_gap"] > 1.0, [r["eval/proxy_gold_gap"] for r in evals]
    assert len(list((tmp_path / "samples").glob("step-*.jsonl"))) == 3
    _check_report(tmp_path)


def test_offline_dpo_eval_on_heldout_pair_prompts(tiny_dir, files, tmp_path, monkeypatch):
    from tether.train.dpo import DPOConfig, train

    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))
    rows = [{"prompt": f"Say {i}:", "chosen": "EEEEEEEE", "rejected": "xkq zzv"} for i in range(40)]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "dpo"
    cfg = DPOConfig(
        model=str(tiny_dir),
        train_data=str(prefs),
        output_dir=str(out),
        learning_rate=5e-3,
        lr_scheduler="constant",
        batch_size=8,
        max_steps=12,
        logging_steps=4,
        eval_steps=6,
        save_steps=0,
        beta=0.1,
        max_length=48,
        max_prompt_length=16,
        seed=1,
        eval_fraction=0.2,
        reward=PROXY,
        max_new_tokens=10,
        **_eval_kw(files),
    )
    train(cfg)
    evals = _evals(out)
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[0]["eval/kl/exact"] == pytest.approx(0.0, abs=1e-6)  # live copy = policy
    assert "eval/loss" in evals[-1]  # the preference eval still runs beside it
    assert evals[-1]["eval/proxy"] > evals[0]["eval/proxy"] + 0.05  # it learned to write capitals
    assert evals[-1]["eval/proxy_gold_gap"] > 0.5
    rows = [json.loads(x) for x in (out / "samples" / "step-000012.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in rows} <= {f"Say {i}:" for i in range(40)}
    assert len(rows) == 8 * 4  # 8 held-out prompts (40 × 0.2), 4 samples each
    _check_report(out)


def test_entropy_is_exact_at_step0(tiny_dir, files, tmp_path):
    """eval/entropy equals a direct float64 full-softmax computation on the step-0 samples."""
    from tether.data import load_prompt_dataset
    from tether.models import forward_logprobs, load_policy
    from tether.train.ppo import train

    train(_rl_cfg(tiny_dir, files, tmp_path, max_steps=1, eval_steps=1, eval_offtask_prompts=None))
    first = _evals(tmp_path)[0]
    path = tmp_path / "samples" / "step-000000.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    pol = load_policy(str(tiny_dir))
    prompt_ids = {
        e.prompt: e.prompt_ids for e in load_prompt_dataset(files / "p.jsonl", pol.tokenizer)
    }
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            p_ids = prompt_ids[r["prompt"]]
            ids = torch.tensor([p_ids + r["token_ids"]])
            out = forward_logprobs(
                pol.model, ids, torch.ones_like(ids, dtype=torch.bool), return_logits=True
            )
            logp = torch.log_softmax(out.logits[0, len(p_ids) - 1 :].double(), -1)
            total += float(-(logp.exp() * logp).sum())
            count += len(r["token_ids"])
    assert first["eval/entropy"] == pytest.approx(total / count, rel=1e-4)


def test_scoring_is_fp32_under_bf16_autocast(tiny_dir):
    """Inside bf16 autocast (the training numerics), score_responses' exact KL, k1 and entropy
    with the fp32 numerics equal a float64 computation of the same responses."""
    from tether.models import SamplingConfig, generate, load_policy
    from tether.models.numerics import fp32_numerics
    from tether.reference import CopyReference

    pol = load_policy(str(tiny_dir))
    ref = CopyReference(pol.model)
    with torch.no_grad():
        for p in pol.model.parameters():
            p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(0)))
    tok = pol.tokenizer
    ids = [tok(f"Say {i}:", add_special_tokens=False).input_ids for i in range(3)]
    ro = generate(pol.model, tok, ids, SamplingConfig(max_new_tokens=6), generator_seed=0)
    from tether.eval.heldout import score_responses

    with torch.autocast("cpu", dtype=torch.bfloat16):
        sc = score_responses(
            pol.model,
            ref,
            ro.input_ids,
            ro.attention_mask,
            ro.response_mask,
            ro.prompt_length,
            1.0,
            lambda: fp32_numerics("cpu"),
        )
    p0 = ro.prompt_length - 1
    with torch.no_grad():
        pos = (ro.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kw = dict(attention_mask=ro.attention_mask.long(), position_ids=pos)
        lp = torch.log_softmax(pol.model(ro.input_ids, **kw).logits.double(), -1)[:, p0:-1]
        lr = torch.log_softmax(ref.model(ro.input_ids, **kw).logits.double(), -1)[:, p0:-1]
    m = ro.response_mask
    exact = ((lp.exp() * (lp - lr)).sum(-1) * m).sum(-1)
    tgt = ro.response_ids[..., None]
    k1 = ((lp.gather(-1, tgt) - lr.gather(-1, tgt)).squeeze(-1) * m).sum(-1)
    ent = (-(lp.exp() * lp).sum(-1))[m].sum()
    assert sc.exact == pytest.approx(exact.tolist(), abs=1e-5)
    assert sc.k1 == pytest.approx(k1.tolist(), abs=1e-5)
    assert sc.entropy_sum == pytest.approx(float(ent), rel=1e-5)


def test_base_cache_shares_the_step0_evaluation(tiny_dir, files, tmp_path, monkeypatch):
    """Two runs from the same policy with the same eval settings evaluate the untrained policy
    once: the second loads step 0 (metrics and samples) from eval_base_cache; a run with other
    eval settings does not; later steps are always measured."""
    from tether.eval import heldout
    from tether.train.ppo import train

    cache = tmp_path / "base"
    kw = dict(max_steps=2, eval_steps=2, eval_base_cache=str(cache))
    train(_rl_cfg(tiny_dir, files, tmp_path / "a", **kw))
    assert len(list(cache.glob("base-*.json"))) == 1
    calls = []
    real = heldout.HeldOutEvaluator._sample_and_score

    def spy(self, model, reference, shard, k, autocast, numerics, step):
        calls.append(step)
        return real(self, model, reference, shard, k, autocast, numerics, step)

    monkeypatch.setattr(heldout.HeldOutEvaluator, "_sample_and_score", spy)
    train(_rl_cfg(tiny_dir, files, tmp_path / "b", learning_rate=1e-3, **kw))
    assert calls == [2]  # step 0 came from the cache
    a, b = _evals(tmp_path / "a")[0], _evals(tmp_path / "b")[0]
    drop = {"time", "eval/seconds"}
    assert {k: v for k, v in a.items() if k not in drop} == {
        k: v for k, v in b.items() if k not in drop
    }
    same = (tmp_path / "a" / "samples" / "step-000000.jsonl").read_text()
    assert (tmp_path / "b" / "samples" / "step-000000.jsonl").read_text() == same
    train(_rl_cfg(tiny_dir, files, tmp_path / "c", eval_samples_per_prompt=2, **kw))
    assert calls == [2, 0, 2] and len(list(cache.glob("base-*.json"))) == 2
