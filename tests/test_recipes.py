"""Every shipped recipe loads into its trainer's config (a typo in a key would be an error), and
the RL recipes run end to end from the CLI on the tiny model."""

import json
from pathlib import Path

import pytest

from tether.cli import main
from tether.runs import read_metrics
from tether.runs.config import load_config
from tether.runs.registry import TRAINERS, get_trainer

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def test_there_is_a_recipe_per_lm_trainer():
    assert {p.stem for p in RECIPES} == set(TRAINERS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads(path):
    cls, _ = get_trainer(path.stem)
    cfg = load_config(cls, path)
    assert cfg.output_dir.startswith("runs/")


LAB_RECIPES = sorted((Path(__file__).parents[1] / "recipes" / "lab").glob("*.yaml"))


@pytest.mark.parametrize("path", LAB_RECIPES, ids=lambda p: p.stem)
def test_lab_recipe_loads_and_its_arms_name_real_fields(path):
    from tether.lab.config import LabConfig

    cfg = load_config(LabConfig, path)
    cfg.check_trainer_fields()
    assert cfg.output_dir.startswith("runs/")


@pytest.mark.parametrize("algo", ["ppo", "ppo_penalty", "grpo", "rloo", "trpo"])
def test_rl_recipe_runs_from_the_cli(algo, tiny_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Say {i}:"}) for i in range(8)))
    out = tmp_path / algo
    argv = [
        "train",
        algo,
        "-c",
        str(Path(__file__).parents[1] / "recipes" / f"{algo}.yaml"),
        f"model={tiny_dir}",
        f"prompts={prompts}",
        f"output_dir={out}",
        "as_chat=false",
        "reward=tests.helpers.rewards:vowel_fraction",
        "max_steps=2",
        "batch_size=2",
        "max_new_tokens=6",
        "save_steps=0",
        "mixed_precision=no",
        # held-out evaluation at step 0 and at the end, small
        "eval_num_prompts=2",
        "eval_samples_per_prompt=2",
        "eval_semantic=false",
        "eval_capability_passages=4",
        "eval_offtask_num=2",
    ]
    if algo == "trpo":
        argv.append("peft={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}")
    assert main(argv) == 0
    rows = [r for r in read_metrics(out) if "score" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert (out / "final").is_dir()
    evals = [r for r in read_metrics(out) if "eval/kl/exact" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval/kl/exact"] == pytest.approx(0.0, abs=1e-6)  # π_θ = π_ref at step 0


ACCELERATE_CONFIGS = sorted(
    (Path(__file__).resolve().parents[1] / "recipes" / "accelerate").glob("*.yaml")
)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load_and_launch_several_processes(path):
    """Each recipes/accelerate config is read by the installed accelerate (unknown keys are
    errors, nested FSDP/DeepSpeed keys are launch options) and resolves to a multi-process
    launcher, never the one-process simple launcher."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    dests = {a.dest for a in launch_command_parser()._actions}
    cfg = load_config_from_file(str(path))
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(cfg, section) or {}:
            name = key if section != "fsdp_config" or key.startswith("fsdp") else f"fsdp_{key}"
            assert name in dests, f"{path.name}: {section}.{key} is not an accelerate option"
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = _validate_launch_command(args)
    assert not args.cpu and (args.multi_gpu or args.use_fsdp or args.use_deepspeed), path.name
    assert args.num_processes >= 2, path.name


def test_accelerate_configs_exist():
    names = {p.name for p in ACCELERATE_CONFIGS}
    assert {"ddp.yaml", "ddp-cpu.yaml", "fsdp.yaml", "fsdp2.yaml", "multi-node.yaml"} <= names
    assert {"deepspeed-zero2.yaml", "deepspeed-zero3.yaml"} <= names


DATA_FIELDS = ("train_data", "eval_data", "prompts", "eval_prompts")


@pytest.mark.parametrize("path", RECIPES + LAB_RECIPES, ids=lambda p: p.parent.name + "/" + p.stem)
def test_recipe_data_paths_resolve_from_any_directory(path, tmp_path, monkeypatch):
    """`-c /abs/recipes/x.yaml` from elsewhere: the data paths a recipe names resolve against
    the recipe file (and exist: the quickstart data ships in data/); output_dir stays relative
    to the working directory."""
    from tether.lab.config import LabConfig

    cls = LabConfig if path.parent.name == "lab" else get_trainer(path.stem)[0]
    at_root = load_config(cls, path)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cls, path.resolve())
    assert cfg.output_dir == at_root.output_dir  # not resolved against the recipe
    named = [getattr(cfg, f) for f in DATA_FIELDS if isinstance(getattr(cfg, f, None), str)]
    assert named, f"{path.name} names no data file"
    for value in named:
        assert Path(value).is_absolute() and Path(value).is_file(), value


def test_recipe_paths_are_shown_relative_to_the_working_directory(monkeypatch):
    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)
    cls, _ = get_trainer("grpo")
    assert load_config(cls, "recipes/grpo.yaml").prompts == "data/movie_review_prompts.jsonl"


def test_only_recipe_values_that_exist_there_are_resolved(tmp_path, monkeypatch):
    from tether.runs.config import resolve_recipe_paths

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "p.jsonl").write_text("{}\n")
    (tmp_path / "r" / "ds").mkdir()
    monkeypatch.chdir(tmp_path)
    data = {
        "prompts": "p.jsonl",
        "eval_data": "ds:test",
        "prompts_2": "ds:cfg:test",
        "reward": "vader",
        "model": "smollm2-135m-instruct",
        "output_dir": "p.jsonl",
        "eval_rewards": ["p.jsonl", "textblob"],
        "arms": [{"set": {"eval_prompts": "p.jsonl"}}],
        "absolute": str(tmp_path / "x.jsonl"),
    }
    out = resolve_recipe_paths(data, tmp_path / "r")
    assert out == {
        "prompts": "r/p.jsonl",
        "eval_data": "r/ds:test",
        "prompts_2": "r/ds:cfg:test",
        "reward": "vader",
        "model": "smollm2-135m-instruct",
        "output_dir": "p.jsonl",
        "eval_rewards": ["r/p.jsonl", "textblob"],
        "arms": [{"set": {"eval_prompts": "r/p.jsonl"}}],
        "absolute": str(tmp_path / "x.jsonl"),
    }
    # a recipe in the working directory itself: nothing to do
    assert resolve_recipe_paths({"prompts": "p.jsonl"}, Path(".")) == {"prompts": "p.jsonl"}
