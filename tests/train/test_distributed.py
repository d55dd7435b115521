"""Multi-process runs equal single-process runs with the same global batch (CPU, gloo).

Every trainer is run twice on the tiny model: on 2 processes with ``batch_size`` B per process
(``torchrun --nproc_per_node 2``) and on 1 process with ``batch_size`` 2B. Sampling is seeded per
sample (:func:`tether.models.generation.sample_seeds`) and every batch statistic is reduced over
processes (:mod:`tether.train.distributed`), so the two runs must log the same losses, rewards,
KLs, β and learning-rate trajectories (the recipes' warmup + cosine schedule: it advances once
per optimizer step, whatever the number of processes) and end with the same weights, up to float
summation order. The same under ``sharding=fsdp2`` (FSDP2 on gloo: each process holds half of
every parameter), for every trainer that supports it. Also: a 2-"node" run over loopback, a
2-process checkpoint (plain and sharded) resumed on 1 and on 2 processes, online DPO with a
process whose pairs all tie (it used to hang), and a precomputed DPO reference built once for
both processes.

All runs of one launch share one Python process per rank (tests/helpers/dist_driver.py), so the
~10 s import of torch and transformers is paid once per launch.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.runs import read_metrics
from tether.train.common import DataCursor
from tether.train.distributed import Dist, MetricSums, check_same

ROOT = Path(__file__).resolve().parents[2]
REWARD = "tests.helpers.rewards:lowercase_fraction"
TIE_JUDGE = "tests.helpers.rewards:ties_on_odd_prompts"
N_PROMPTS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TETHER_CACHE"] = str(tmp / "cache")  # the precomputed reference is built fresh here
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _launch(jobs: list[list[str]], tmp: Path, name: str, nproc: int) -> None:
    spec = tmp / f"{name}.json"
    spec.write_text(json.dumps(jobs))
    if nproc == 1:
        cmd = [sys.executable, "-m", "tests.helpers.dist_driver", str(spec)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "tests.helpers.dist_driver",
            str(spec),
        ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


# -- the jobs --------------------------------------------------------------------------------


def _sampling(tiny, prompts, b, **kw):
    base = {
        "model": str(tiny),
        "prompts": str(prompts),
        "max_new_tokens": 8,
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
        "batch_size": b,
        "logging_steps": 1,
        "save_steps": 0,
        "seed": 3,
        "mixed_precision": "no",
        "eval_steps": 0,
    }
    base.update(kw)
    return base


def _prefs_cfg(tiny, prefs, b, **kw):
    base = {
        "model": str(tiny),
        "train_data": str(prefs),
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
        "batch_size": b,
        "gradient_accumulation_steps": 2,
        "logging_steps": 1,
        "eval_steps": 3,
        "save_steps": 0,
        "max_steps": 3,
        "max_length": 48,
        "max_prompt_length": 24,
        "seed": 1,
        "mixed_precision": "no",
    }
    base.update(kw)
    return base


SHARDED = (
    "grpo",
    "ppo",
    "online_dpo",
    "dpo",
    "dpo_lora",
    "reward",
    "sft",
    "grpo_eval",
    "grpo_kl_max",
)
"""The trainers also run with ``sharding=fsdp2`` on 2 processes (``<name>_fsdp2``); TRPO refuses
it (its Fisher-vector products need double backward through the parameters)."""
RESUMED = {"grpo": "grpo", "grpo_fsdp2": "grpo", "dpo_lora_fsdp2": "dpo_lora"}
"""Runs (→ the trainer config they use) stopped after step 2 (the step-3 checkpoint and final/
removed) and resumed."""


def _argv(algo: str, cfg: dict, out: Path) -> list[str]:
    return ["train", algo, f"output_dir={out}"] + [f"{k}={v}" for k, v in cfg.items()]


def _trainers(tiny, prompts, prefs):
    """algo → (config for per-process batch B, B): the 1-process run gets batch 2B."""
    rl = {"reward": REWARD, "learning_rate": 3e-3, "max_steps": 3}

    def dpo(b, **kw):
        return _prefs_cfg(tiny, prefs, b, learning_rate=3e-3, beta=0.5, eval_generate=False, **kw)

    return {
        "grpo": (
            "grpo",
            lambda b: _sampling(
                tiny,
                prompts,
                b,
                num_generations=2,
                kl_controller="adaptive",
                kl_target=0.05,
                kl_horizon=40,
                **rl,
            ),
            2,
        ),
        "ppo": (
            "ppo",
            lambda b: _sampling(
                tiny,
                prompts,
                b,
                num_generations=2,
                ppo_epochs=2,
                target_kl=0.5,
                kl_controller="adaptive",
                kl_target=0.05,
                kl_horizon=40,
                **rl,
            ),
            2,
        ),
        "trpo": (
            "trpo",
            lambda b: _sampling(tiny, prompts, b, num_generations=2, max_kl=0.02, cg_iters=5, **rl),
            2,
        ),
        "online_dpo": (
            "online_dpo",
            lambda b: _sampling(
                tiny,
                prompts,
                b,
                judge=TIE_JUDGE,
                learning_rate=3e-3,
                max_steps=4,
                beta_schedule="adaptive",
                kl_target=0.05,
                kl_horizon=40,
                save_steps=2,
            ),
            2,
        ),
        "dpo": ("dpo", lambda b: dpo(b), 4),
        "dpo_precomputed": ("dpo", lambda b: dpo(b, reference="precomputed"), 4),
        "dpo_lora": (
            "dpo",
            lambda b: dpo(b, peft="{r: 4, lora_alpha: 8}", reference="adapter"),
            4,
        ),
        "grpo_kl_max": (
            "grpo",
            # KL after the update 0.36, 0.40, 0.30 from the initial weights: steps 1 and 2 are
            # rolled back, step 3 is kept (the margins, ≥ 3e-3 nats, dwarf float rounding)
            lambda b: _sampling(
                tiny, prompts, b, num_generations=2, kl_max=0.3, warmup_steps=0, **rl
            ),
            2,
        ),
        "grpo_eval": (
            "grpo",
            lambda b: _sampling(
                tiny,
                prompts,
                b,
                num_generations=2,
                eval_steps=2,
                eval_num_prompts=5,  # 5 prompts over 2 processes: shares of 3 and 2
                eval_samples_per_prompt=2,
                eval_semantic=False,
                eval_capability_passages=3,
                **rl,
            ),
            2,
        ),
        "reward": ("reward", lambda b: _prefs_cfg(tiny, prefs, b, learning_rate=2e-3), 4),
        "sft": ("sft", lambda b: _sft_cfg(tiny, prefs.parent / "sft.jsonl", b), 4),
    }


def _sft_cfg(tiny, sft, b):
    """SFT rows of different lengths: each process's share of a step has its own token count, so
    only a loss normalised by the global count matches the 1-process run."""
    return {
        "model": str(tiny),
        "train_data": str(sft),
        "eval_fraction": 0.25,
        "learning_rate": 3e-3,
        "lr_scheduler": "cosine",
        "warmup_steps": 1,
        "batch_size": b,
        "gradient_accumulation_steps": 2,
        "logging_steps": 1,
        "eval_steps": 2,
        "save_steps": 0,
        "max_steps": 3,
        "max_length": 48,
        "seed": 1,
        "mixed_precision": "no",
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("dist-data")
    prompts = d / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Say {i}:"}) for i in range(N_PROMPTS)))
    words = ["film", "plot", "cast", "story", "scene", "music"]
    rows = [
        {
            "prompt": f"Review {i}: the {words[i % 6]} was",
            "chosen": f" good, {words[(i * 5) % 6]} good",
            "rejected": f" bad, {words[(i * 7) % 6]} bad",
        }
        for i in range(40)
    ]
    prefs = d / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps(r) for r in rows))
    sft = [
        {"prompt": r["prompt"], "completion": r["chosen"] * (1 + i % 4)} for i, r in enumerate(rows)
    ]
    (d / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in sft))
    return tiny_dir, prompts, prefs


def _fork_for_resume(src: Path, dst: Path, last_step: int) -> None:
    """``dst``: the run ``src`` as if it had stopped after its step-2 checkpoint (the later
    checkpoints and final/ gone), to be resumed."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / f"step-{last_step:06d}")
    shutil.rmtree(dst / "final")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Every trainer on 1 and on 2 processes (and sharded on 2, and DPO sharded on 1), plus the
    resume and 2-node runs."""
    tiny, prompts, prefs = data
    tmp = tmp_path_factory.mktemp("dist")
    trainers = _trainers(tiny, prompts, prefs)
    single, multi = [], []
    for name, (algo, cfg, b) in trainers.items():
        single.append(_argv(algo, cfg(2 * b), tmp / "1" / name))
        multi.append(_argv(algo, cfg(b), tmp / "2" / name))
        if name in SHARDED:
            multi.append(_argv(algo, dict(cfg(b), sharding="fsdp2"), tmp / "2" / f"{name}_fsdp2"))
    algo, cfg, b = trainers["dpo"]
    single.append(_argv(algo, dict(cfg(2 * b), sharding="fsdp2"), tmp / "1" / "dpo_fsdp2"))
    # resume: GRPO (adaptive β, warmup + cosine) plain and sharded, and a sharded LoRA DPO, on 2
    # processes, checkpointed at step 2 with the optimizer state; stopped there and resumed on 1
    # and on 2 processes
    ckpt = {"save_steps": 2, "save_optimizer": "all", "keep_last": 5}
    for name, base in RESUMED.items():
        algo, cfg, b = trainers[base]
        shard = {"sharding": "fsdp2"} if name.endswith("fsdp2") else {}
        multi.append(_argv(algo, dict(cfg(b), **ckpt, **shard), tmp / "src" / name))
    _launch(multi, tmp, "multi", 2)
    again, single_resumes = [], []
    for name, base in RESUMED.items():
        algo, cfg, b = trainers[base]
        shard = {"sharding": "fsdp2"} if name.endswith("fsdp2") else {}
        for n, jobs in ((1, single_resumes), (2, again)):
            where = tmp / f"resume-on-{n}" / name
            _fork_for_resume(tmp / "src" / name, where, last_step=3)
            jobs.append(_argv(algo, dict(cfg(2 * b // n), **ckpt, **shard, resume=True), where))
    _launch(single + single_resumes, tmp, "single", 1)
    _launch(again, tmp, "again", 2)
    return tmp


def _metric_rows(path: Path, key: str) -> list[dict]:
    return [r for r in read_metrics(path) if key in r]


def _assert_close_metrics(
    a: Path, b: Path, keys: list[str], rtol=1e-4, atol=1e-5, schedule_moves: bool = True
):
    """The runs log the same steps, and the same values of ``keys`` and of the learning rate
    (a schedule that moves at every step, unless ``schedule_moves`` is off: kl_max roll-backs
    restore it)."""
    keys = [*keys, "lr"]
    ra, rb = read_metrics(a), read_metrics(b)
    lrs = [r["lr"] for r in ra if "lr" in r]
    if schedule_moves:
        assert len(set(lrs)) >= min(3, len(lrs)), lrs
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    checked = 0
    for x, y in zip(ra, rb, strict=True):
        for k in keys:
            if k in x or k in y:
                assert k in x and k in y, (k, x.get("step"))
                assert x[k] == pytest.approx(y[k], rel=rtol, abs=atol), (k, x["step"], x[k], y[k])
                checked += 1
    assert checked >= len(ra), "no metric compared"


def _assert_same_weights(a: Path, b: Path, atol=5e-5, file="model.safetensors"):
    wa = load_file(str(a / "final" / file))
    wb = load_file(str(b / "final" / file))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < atol, worst
    if file != "model.safetensors":  # an adapter: it starts at B = 0
        moved = max(float(wa[k].abs().max()) for k in wa if "lora_B" in k)
    else:
        initial = load_file(str(Path(read_config(a)["model"]) / "model.safetensors"))
        moved = max(float((wa[k] - initial[k]).abs().max()) for k in wa if k in initial)
    assert moved > 50 * atol, "the run did not move the weights: the comparison proves nothing"


def read_config(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


RL_KEYS = ["score", "score_std", "kl/k1", "kl/k3", "beta", "loss/policy", "clip_fraction"]


@pytest.mark.parametrize("name", ["grpo", "ppo", "trpo"])
def test_rl_two_processes_equal_one(runs, name):
    keys = (
        RL_KEYS
        + {
            "ppo": ["loss/value", "grad_norm", "epochs"],
            "trpo": ["trpo/kl", "trpo/improvement", "trpo/step_fraction", "loss/value"],
            "grpo": ["grad_norm", "response_length"],
        }[name]
    )
    _assert_close_metrics(runs / "1" / name, runs / "2" / name, keys)
    _assert_same_weights(runs / "1" / name, runs / "2" / name)


def test_beta_moves_and_is_the_same(runs):
    """The adaptive controller saw the global KL and the global sample count: β moved, and by
    the same amount on 1 and 2 processes (each rank's β is checked equal at every save)."""
    for name in ("grpo", "ppo"):
        b1 = [r["beta"] for r in _metric_rows(runs / "1" / name, "beta")]
        b2 = [r["beta"] for r in _metric_rows(runs / "2" / name, "beta")]
        assert b1 == pytest.approx(b2, rel=1e-6)
        assert len(set(b1)) == len(b1), b1  # β changed every step


def test_online_dpo_with_an_all_tie_process_equals_one(runs, data):
    """A process whose pairs all tie joins the gradient all-reduce (it used to hang), and the
    loss is the mean over every process's pairs."""
    tiny, prompts, _ = data
    n = N_PROMPTS
    # the test exercises the case: some step gives one process only odd (tied) prompts
    cursors = [DataCursor(n, 2, 3, 2, r) for r in range(2)]
    lonely = []
    for _ in range(4):
        shares = [c.next_indices() for c in cursors]
        lonely.append(any(all(i % 2 for i in s) for s in shares))
    assert any(lonely), "no step had a process with only tied pairs"
    keys = ["loss", "rewards/accuracy", "rewards/margin", "kl/k1", "kl/k3", "beta", "pairs"]
    _assert_close_metrics(runs / "1" / "online_dpo", runs / "2" / "online_dpo", keys)
    _assert_same_weights(runs / "1" / "online_dpo", runs / "2" / "online_dpo")


@pytest.mark.parametrize("name", ["dpo", "dpo_precomputed"])
def test_dpo_two_processes_equal_one(runs, name):
    keys = ["loss", "rewards/accuracy", "rewards/margin", "kl/chosen_k3", "eval/loss"]
    _assert_close_metrics(runs / "1" / name, runs / "2" / name, keys)
    _assert_same_weights(runs / "1" / name, runs / "2" / name)


def test_sft_two_processes_equal_one(runs):
    keys = ["loss", "nll", "tokens", "eval/nll"]
    _assert_close_metrics(runs / "1" / "sft", runs / "2" / "sft", keys)
    _assert_same_weights(runs / "1" / "sft", runs / "2" / "sft")


def test_precomputed_reference_built_once_and_whole(runs):
    cache = runs / "cache" / "reference"
    tables = sorted(cache.glob("*.safetensors"))
    assert len(tables) == 1, tables  # both launches, both processes: one cache
    meta = json.loads(tables[0].with_suffix(".json").read_text())
    assert meta["sequences"] > 0
    assert not list(cache.glob("*.tmp*"))


def test_reward_two_processes_equal_one(runs):
    keys = ["loss", "accuracy", "eval/loss", "eval/accuracy"]
    _assert_close_metrics(runs / "1" / "reward", runs / "2" / "reward", keys)


def test_lora_two_processes_equal_one(runs):
    keys = ["loss", "rewards/accuracy", "rewards/margin", "kl/chosen_k3", "eval/loss"]
    _assert_close_metrics(runs / "1" / "dpo_lora", runs / "2" / "dpo_lora", keys)
    _assert_same_weights(runs / "1" / "dpo_lora", runs / "2" / "dpo_lora", file=ADAPTER)


@pytest.mark.parametrize("where", ["resume-on-1", "resume-on-2"])
@pytest.mark.parametrize("name", list(RESUMED))
def test_two_process_checkpoint_resumes(runs, where, name):
    """A 2-process run (plain or sharded; a sharded LoRA adapter, its frozen base not in the
    checkpoint) stopped after its step-2 checkpoint and resumed on 1 (batch 2B) or 2 processes
    ends as the uninterrupted run: weights, optimizer moments, the LR schedule, β, the data
    cursor and the RNG all continue. A sharded checkpoint is resharded from 2 processes to 1."""
    base = RESUMED[name]
    keys = SHARDED_KEYS[base]
    _assert_close_metrics(runs / "1" / base, runs / where / name, keys)
    file = ADAPTER if base == "dpo_lora" else "model.safetensors"
    _assert_same_weights(runs / "1" / base, runs / where / name, file=file)
    # the step after the checkpoint was run again, from it
    assert (runs / where / name / "checkpoints" / "step-000003").is_dir()
    assert not (runs / where / name / "checkpoints" / "step-000001").exists()


# -- sharding=fsdp2 -----------------------------------------------------------------------------

ADAPTER = "adapter_model.safetensors"
EVAL_KEYS = ["eval/proxy", "eval/kl/exact", "eval/kl/k3", "eval/nll", "eval/kl/offtask"]
SHARDED_KEYS = {
    "grpo": RL_KEYS + ["grad_norm", "response_length"],
    "ppo": RL_KEYS + ["loss/value", "grad_norm", "epochs"],
    "online_dpo": ["loss", "rewards/accuracy", "rewards/margin", "kl/k1", "kl/k3", "beta"],
    "dpo": ["loss", "rewards/accuracy", "rewards/margin", "kl/chosen_k3", "eval/loss"],
    "dpo_lora": ["loss", "rewards/accuracy", "rewards/margin", "kl/chosen_k3", "eval/loss"],
    "reward": ["loss", "accuracy", "eval/loss", "eval/accuracy"],
    "sft": ["loss", "nll", "tokens", "eval/nll"],
    "grpo_eval": RL_KEYS + EVAL_KEYS,
    "grpo_kl_max": RL_KEYS + ["kl/after_update", "kl_max/rolled_back"],
}


def test_kl_max_rolls_back_the_same_updates_everywhere(runs):
    """``kl_max`` rolls an update back (parameters, AdamW state, LR schedule) on every process
    together, also with sharded parameters: the same steps as on one process."""
    one = runs / "1" / "grpo_kl_max"
    rows = [r for r in read_metrics(one) if "kl_max/rolled_back" in r]
    assert [r["kl_max/rolled_back"] for r in rows] == [1.0, 1.0, 0.0], rows
    keys = SHARDED_KEYS["grpo_kl_max"]
    _assert_close_metrics(one, runs / "2" / "grpo_kl_max", keys, schedule_moves=False)
    _assert_same_weights(one, runs / "2" / "grpo_kl_max")


@pytest.mark.parametrize("name", SHARDED)
def test_fsdp2_two_processes_equal_one(runs, name):
    """``sharding=fsdp2`` on 2 processes logs what 1 unsharded process logs and ends with the
    same weights (final/ gathered into one model)."""
    one, sharded = runs / "1" / name, runs / "2" / f"{name}_fsdp2"
    moves = name != "grpo_kl_max"
    _assert_close_metrics(one, sharded, SHARDED_KEYS[name], schedule_moves=moves)
    if name == "reward":
        a = load_file(str(one / "reward_model" / "model.safetensors"))
        b = load_file(str(sharded / "reward_model" / "model.safetensors"))
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 5e-5
        head_a = load_file(str(one / "reward_model" / "reward_head.safetensors"))["weight"]
        head_b = load_file(str(sharded / "reward_model" / "reward_head.safetensors"))["weight"]
        torch.testing.assert_close(head_a, head_b, rtol=0, atol=5e-5)
    else:
        _assert_same_weights(
            one, sharded, file=ADAPTER if name == "dpo_lora" else "model.safetensors"
        )


def test_heldout_evaluation_on_uneven_shards(runs):
    """Held-out evaluation of 5 prompts on 2 processes (DDP: shares of 3 and 2; FSDP2: every
    process all of them, its forwards being collectives) gives the 1-process metrics."""
    one = runs / "1" / "grpo_eval"
    rows = [r for r in read_metrics(one) if "eval/kl/exact" in r]
    assert [r["step"] for r in rows] == [0, 2, 3], rows
    assert rows[-1]["eval/kl/exact"] > 0
    for other in ("grpo_eval", "grpo_eval_fsdp2"):
        _assert_close_metrics(one, runs / "2" / other, EVAL_KEYS)


def test_fsdp2_on_one_process_equals_unsharded(runs):
    """``sharding=fsdp2`` on a single process (a world of one) trains as ``sharding=none``."""
    keys = ["loss", "rewards/accuracy", "rewards/margin", "kl/chosen_k3", "eval/loss"]
    _assert_close_metrics(runs / "1" / "dpo", runs / "1" / "dpo_fsdp2", keys)
    _assert_same_weights(runs / "1" / "dpo", runs / "1" / "dpo_fsdp2")


def test_fsdp2_final_loads_in_plain_transformers(runs):
    """final/ of a sharded run is one HF model: transformers loads it (no tether, no
    torch.distributed) and it holds the 1-process run's weights."""
    from transformers import AutoModelForCausalLM

    final = runs / "2" / "dpo_fsdp2" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(final)
    expected = load_file(str(runs / "1" / "dpo" / "final" / "model.safetensors"))
    state = model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=5e-5)
    assert (final / "tokenizer.json").is_file()


def test_fsdp2_checkpoint_is_sharded(runs):
    """A sharded run's checkpoint holds DCP states of its model and optimizer, one file of
    shards per process, and no whole copy of the weights."""
    ckpt = runs / "src" / "grpo_fsdp2" / "checkpoints" / "step-000002"
    manifest = json.loads((ckpt / "checkpoint.json").read_text())
    assert manifest["sharded"] and manifest["models"]["policy"]["sharded"]
    for part in ("model", "optimizer"):
        assert (ckpt / part / ".metadata").is_file()
        assert len(list((ckpt / part).glob("*.distcp"))) == 2, part
    assert not list(ckpt.glob("*.safetensors")) and not (ckpt / "optimizer.pt").exists()


def test_two_nodes_on_loopback(tmp_path, data, runs):
    """``torchrun --nnodes 2 --node_rank {0,1}`` over 127.0.0.1: the same run as one process."""
    tiny, prompts, prefs = data
    algo, cfg, b = _trainers(tiny, prompts, prefs)["grpo"]
    spec = tmp_path / "node.json"
    spec.write_text(json.dumps([_argv(algo, cfg(b), tmp_path / "run")]))
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "tests.helpers.dist_driver",
                str(spec),
            ],
            cwd=ROOT,
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    _assert_close_metrics(runs / "1" / "grpo", tmp_path / "run", RL_KEYS)
    _assert_same_weights(runs / "1" / "grpo", tmp_path / "run")


# -- the pieces, on one process ------------------------------------------------------------


def test_metric_sums_weigh_by_count_not_by_call():
    m = MetricSums()
    m.mean("a", 1.0, 3)  # a mean over 3 items
    m.mean("a", 4.0, 1)
    m.ratio("b", 6.0, 4)
    m.ratio("b", 0.0, 0)
    m.total("c", 2.0)
    m.total("c", 3.0)
    m.ratio("empty", 0.0, 0)
    out = m.reduce(Dist())
    assert out == {"a": pytest.approx(7 / 4), "b": 1.5, "c": 5.0, "empty": 0.0}


def test_check_same_is_silent_on_one_process():
    check_same(Dist(), "x", {"beta": 1.0})


def test_whiten_with_a_reduce_equals_the_whole_batch():
    """Two shards whitened with a reduce that sums both shards' statistics give the whole
    batch's whitening (two-pass mean and variance)."""
    from tether.core.masked import masked_count, masked_sum, masked_whiten

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 7, generator=g) * 3 + 1
    mask = torch.rand(6, 7, generator=g) > 0.3
    whole = masked_whiten(x, mask)
    shards = [(x[:2], mask[:2]), (x[2:], mask[2:])]
    # what all_reduce returns on every rank at each of the two passes: the sum over shards
    first = [torch.stack([masked_sum(xs, ms), masked_count(ms).float()]) for xs, ms in shards]
    s0 = first[0] + first[1]
    mean = s0[0] / s0[1]
    s1 = sum(masked_sum((xs - mean) ** 2, ms) for xs, ms in shards)
    parts = []
    for xs, ms in shards:
        totals = iter([s0, s1])
        parts.append(masked_whiten(xs, ms, reduce=lambda t, it=totals: next(it)))
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)


def test_row_seeded_sampling_is_batch_invariant_and_samples_the_distribution(tiny_dir):
    """A row's tokens depend on its seed only (not on the batch or the global RNG), and Gumbel-max
    draws follow the softmax: first-token frequencies over many seeds match π(·|prompt) within a
    χ²-style bound."""
    from tether.models import SamplingConfig, generate, load_policy
    from tether.models.generation import sample_seeds

    pol = load_policy(str(tiny_dir))
    tok = pol.tokenizer
    prompts = [tok("Say 1:")["input_ids"], tok("A longer prompt here:")["input_ids"]]
    seeds = sample_seeds(0, 5, 0, 2)
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.7)
    both = generate(pol.model, tok, prompts, cfg, row_seeds=seeds, compute_logprobs=False)
    torch.manual_seed(123)
    alone = generate(pol.model, tok, prompts[1:], cfg, row_seeds=seeds[1:], compute_logprobs=False)
    assert torch.equal(both.response_ids[1], alone.response_ids[0])
    # the distribution of the first token, over 2000 seeds, against the model's own probabilities
    n = 2000
    ids = [prompts[0]] * n
    first = generate(
        pol.model,
        tok,
        ids,
        SamplingConfig(max_new_tokens=1, temperature=0.7),
        row_seeds=sample_seeds(1, 0, 0, n),
        compute_logprobs=False,
        compute_sampler_logprobs=False,
    ).response_ids[:, 0]
    x = torch.tensor([prompts[0]])
    with torch.no_grad():
        logits = pol.model(x).logits[0, -1].float() / 0.7
    p = torch.softmax(logits, -1)
    counts = torch.bincount(first, minlength=p.numel()).float()
    top = p.argsort(descending=True)[:5]
    for t in top:
        se = (p[t] * (1 - p[t]) / n).sqrt()
        assert abs(counts[t] / n - p[t]) < 4 * se + 1e-3, (
            int(t),
            float(counts[t] / n),
            float(p[t]),
        )


def test_accelerate_launch_with_the_cpu_config(tmp_path, data, runs):
    """The documented ``accelerate launch --config_file recipes/accelerate/ddp-cpu.yaml`` starts
    two processes (``--cpu --num_processes 2`` would start one: accelerate's simple launcher) and
    gives the single-process run."""
    tiny, prompts, prefs = data
    algo, cfg, b = _trainers(tiny, prompts, prefs)["grpo"]
    spec = tmp_path / "acc.json"
    spec.write_text(json.dumps([_argv(algo, cfg(b), tmp_path / "run")]))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "recipes" / "accelerate" / "ddp-cpu.yaml"),
        f"--main_process_port={_free_port()}",
        "-m",
        "tests.helpers.dist_driver",
        str(spec),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    manifest = json.loads(
        next((tmp_path / "run" / "checkpoints").glob("*/checkpoint.json")).read_text()
    )
    assert manifest["num_processes"] == 2
    _assert_close_metrics(runs / "1" / "grpo", tmp_path / "run", RL_KEYS)
    _assert_same_weights(runs / "1" / "grpo", tmp_path / "run")
