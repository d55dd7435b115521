"""The lab end to end on the tiny model: a synthetic gold, proxies trained by the reward trainer
on its labels (the tiny LM as their backbone), best-of-n and GRPO / DPO arms, results.json in its
documented schema, the report, the printed summary; then a re-run that resumes from the cache
(nothing sampled or trained) and a changed arm that re-runs alone."""

import json

import pytest

import tether.lab.overopt as overopt
import tether.lab.pool as pool_mod
from tether.cli import main
from tether.lab.config import LabConfig
from tether.lab.overopt import RESULTS_FILE, run_lab, summary_table, validate_results
from tether.runs.config import ConfigError, load_config

GOLD = "tests.helpers.rewards:lowercase_fraction"


def _recipe(tmp_path, tiny_dir, **over):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}:"}) + "\n" for w in "abcdefghijkl"))
    cfg = {
        "output_dir": str(tmp_path / "lab"),
        "model": str(tiny_dir),
        "prompts": str(prompts),
        "gold": GOLD,
        "eval_prompts": 3,
        "eval_samples_per_prompt": 2,
        "max_new_tokens": 6,
        "proxy": {
            "backbone": str(tiny_dir),
            "prompts": 6,
            "samples_per_prompt": 4,
            "pairs": [8, 16],
            "heldout_pairs": 6,
            "ensemble": 2,
            "combine": ["mean"],
            "batch_size": 4,
            "learning_rate": 1e-3,
        },
        "bon": {"pool": 8, "ns": [1, 2, 4, 8], "proxies": ["n8", "n8-mean"]},
        "trainer": {
            "max_steps": 3,
            "eval_steps": 1,
            "batch_size": 2,
            "num_generations": 2,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_steps": 1,
            "mixed_precision": "no",
            "eval_capability_passages": 2,
            "eval_offtask_num": 1,
            "eval_semantic": False,
            "exact_kl_samples": 2,
        },
        "arms": [
            {"name": "grpo", "method": "grpo", "proxy": "n8", "sweep": {"kl_coef": [0.0, 0.5]}},
            {"name": "dpo", "method": "dpo", "proxy": "n8", "set": {"batch_size": 2}},
        ],
    }
    cfg.update(over)
    import yaml

    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory, tiny_dir):
    tmp = tmp_path_factory.mktemp("lab")
    recipe = _recipe(tmp, tiny_dir)
    results = run_lab(load_config(LabConfig, recipe))
    return tmp, recipe, results


def test_lab_results_follow_the_schema(lab_run):
    tmp, _, results = lab_run
    saved = json.loads((tmp / "lab" / RESULTS_FILE).read_text())
    validate_results(saved)
    assert set(saved["proxies"]) == {"n8", "n16", "n8-mean", "n16-mean"}
    assert saved["proxies"]["n8-mean"]["members"] == 2
    names = [a["name"] for a in saved["arms"]]
    assert names == ["bon-n8", "bon-n8-mean", "grpo-kl_coef=0.0", "grpo-kl_coef=0.5", "dpo"]
    bon = saved["arms"][0]
    assert [p["x"] for p in bon["points"]] == [1, 2, 4, 8] and bon["fit"]["form"] == "bon"
    grpo = saved["arms"][2]
    assert [p["x"] for p in grpo["points"]] == [0, 1, 2, 3]  # evals at steps 0..3
    assert grpo["points"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert grpo["fit"]["form"] == "rl" and grpo["settings"] == {"kl_coef": 0.0}
    assert all(p["gold"] == p["gold"] for p in grpo["points"])  # gold measured at every eval
    recipe = (tmp / "lab" / "arms" / "grpo-kl_coef=0.5" / "seed0" / "recipe.yaml").read_text()
    assert "kl_coef: 0.5" in recipe and "lowercase_fraction" in recipe
    arm_dir = tmp / "lab" / "arms" / "grpo-kl_coef=0.5" / "seed0"
    # a finished arm keeps its model and metrics, not its resume-only checkpoints
    assert (arm_dir / "final").is_dir() and (arm_dir / "metrics.jsonl").is_file()
    assert not (arm_dir / "checkpoints").exists()
    # the DPO arm trains on the proxy-labelled pairs it can see: 3 steps × 2 pairs (of 36)
    pairs = (tmp / "lab" / "data" / "proxy-pairs-n8-6.jsonl").read_text().splitlines()
    assert len(pairs) == 6 and len({json.loads(p)["prompt"] for p in pairs}) == 6  # round-robin
    assert (
        "proxy-pairs-n8-6.jsonl"
        in (tmp / "lab" / "arms" / "dpo" / "seed0" / "recipe.yaml").read_text()
    )
    assert set(saved["claims"]) == {"a", "b", "c", "d"}
    assert saved["claims"]["a"]["tested"] and saved["claims"]["d"]["tested"]
    assert not saved["claims"]["c"]["tested"]  # no trained arm on an ensemble
    table = summary_table(saved)
    assert "grpo-kl_coef=0.5 s0" in table and "(d) Does DPO" in table


def test_lab_report_renders(lab_run):
    tmp, _, _ = lab_run
    html = (tmp / "lab" / "report.html").read_text()
    for part in ("Four claims", "Proxies", "Gao et al.", "Reward–KL frontier", "<svg", "token KL"):
        assert part in html, part
    assert main(["lab", "overopt", "--report-only", str(tmp / "lab")]) == 0
    # every chart also as a standalone SVG: namespaced, sized, styled, well-formed XML
    figures = sorted((tmp / "lab" / "figures").glob("*.svg"))
    assert len(figures) == html.count('<svg class="chart"') >= 5
    names = [f.name for f in figures]
    assert "proxy-optimised-vs-sqrt-kl.svg" in names, names
    import xml.etree.ElementTree as ET

    for f in figures:
        root = ET.fromstring(f.read_text())
        assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("width")
        assert root.find("{http://www.w3.org/2000/svg}style") is not None


def test_lab_resumes_from_its_cache_and_reruns_a_changed_arm(lab_run, monkeypatch):
    tmp, recipe, results = lab_run

    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(pool_mod, "sample_texts", boom)
    import tether.train.reward_model as rm

    monkeypatch.setattr(rm, "train", boom)
    trained = []
    real = overopt.Lab.trained_arm

    def spy(self, name, *a, **k):
        trained.append(name)
        return real(self, name, *a, **k)

    monkeypatch.setattr(overopt.Lab, "trained_arm", spy)
    import tether.runs.registry as registry

    real_get = registry.get_trainer

    def no_training(name):
        cls, fn = real_get(name)
        return cls, boom

    monkeypatch.setattr(registry, "get_trainer", no_training)
    again = run_lab(load_config(LabConfig, recipe))
    assert json.dumps(again["arms"]) == json.dumps(results["arms"])  # NaN-safe equality
    # change one arm: only it trains (and the fake trainer says so)
    with pytest.raises(AssertionError, match="ran again"):
        arms = (
            "arms=[{name: grpo, method: grpo, proxy: n8, sweep: {kl_coef: [0.0, 0.5]}}, "
            "{name: dpo, method: dpo, proxy: n8, set: {batch_size: 2, beta: 0.5}}]"
        )
        run_lab(load_config(LabConfig, recipe, [arms]))
    assert trained[-1] == "dpo" and trained.count("dpo") == 2  # the grpo arms were cached


def test_lab_config_errors():
    with pytest.raises(ConfigError, match="proxy 'n99' is not built"):
        load_config(LabConfig, None, ["arms=[{name: x, method: grpo, proxy: n99}]"])
    with pytest.raises(ConfigError, match="two arms are named"):
        load_config(LabConfig, None, ["arms=[{name: x, method: grpo}, {name: x, method: dpo}]"])
    cfg = load_config(LabConfig, None, ["arms=[{name: x, method: dpo, set: {kl_coef: 0.1}}]"])
    with pytest.raises(ValueError, match=r"arm 'x': \['kl_coef'\] are not fields of the dpo"):
        cfg.check_trainer_fields()
    with pytest.raises(ValueError, match="trainer.lr is not a field of any trainer"):
        load_config(LabConfig, None, ["trainer={lr: 0.1}"]).check_trainer_fields()
    with pytest.raises(ConfigError, match="seeds must be null or a non-empty list"):
        load_config(LabConfig, None, ["arms=[{name: x, method: grpo, seeds: []}]"])
    with pytest.raises(ConfigError, match="ns must lie in 1..pool"):
        load_config(LabConfig, None, ["bon={pool: 4, ns: [1, 8]}"])


def test_lab_cli_reports_a_bad_trainer_field_without_a_traceback(capsys, tmp_path):
    from tether.cli import main

    rc = main(["lab", "overopt", f"output_dir={tmp_path / 'lab'}", "trainer={lora: {r: 16}}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "tether lab: error: trainer.lora is not a field of any trainer" in err
    assert "Traceback" not in err and not (tmp_path / "lab").exists()


def test_lab_cli_checks_paths_before_loading_anything(capsys, tmp_path):
    from tether.cli import main

    rc = main(["lab", "overopt", f"output_dir={tmp_path / 'lab'}", "prompts=nope.jsonl"])
    err = capsys.readouterr().err
    assert rc == 2 and "prompts: 'nope.jsonl' not found" in err
    assert not (tmp_path / "lab").exists()
    (tmp_path / "file").write_text("x")
    rc = main(["lab", "overopt", f"output_dir={tmp_path / 'file'}"])
    assert rc == 2 and "exists and is not a directory" in capsys.readouterr().err
