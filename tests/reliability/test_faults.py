"""Faults during training, on the tiny model: each is survived with nothing lost (the resumed run
is bit-identical to an uninterrupted one) or stopped with an error naming the place — and no
checkpoint or final model ever holds non-finite weights.

SIGKILL cases (mid-run, mid-checkpoint) run in subprocesses and are marked ``slow``."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.errors import (
    CheckpointError,
    NumericalError,
    ResumeMismatchError,
    RunDirError,
    TetherWarning,
)
from tether.runs import RunDir, list_checkpoints, read_metrics
from tether.runs.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    rng = random.Random(0)
    words = ["film", "plot", "cast", "story", "scene", "music"]
    rows = [
        {
            "prompt": f"Review {i}: the {rng.choice(words)} was",
            "chosen": f" good, {rng.choice(words)} good",
            "rejected": f" bad, {rng.choice(words)} bad",
        }
        for i in range(48)
    ]
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Say {i}:"}) for i in range(16)))
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "cache"))


def dpo_args(tiny_dir, prefs, out, **kw) -> dict:
    base = dict(
        model=str(tiny_dir),
        train_data=str(prefs),
        output_dir=str(out),
        learning_rate=3e-3,
        lr_scheduler="constant",
        batch_size=4,
        max_steps=6,
        logging_steps=3,
        eval_steps=100,
        save_steps=2,
        keep_last=2,
        beta=0.5,
        max_length=48,
        max_prompt_length=24,
        seed=1,
        eval_generate=False,
        reference="copy",
        exact_kl_samples=0,
    )
    base.update(kw)
    return base


def dpo(tiny_dir, prefs, out, **kw):
    from tether.train.dpo import DPOConfig, train

    return train(DPOConfig(**dpo_args(tiny_dir, prefs, out, **kw)))


def grpo(tiny_dir, prompts, out, **kw):
    from tether.train.grpo import GRPOConfig, train

    base = dict(
        model=str(tiny_dir),
        prompts=str(prompts),
        reward="tests.helpers.rewards:vowel_fraction",
        output_dir=str(out),
        max_new_tokens=8,
        learning_rate=3e-3,
        lr_scheduler="constant",
        batch_size=4,
        num_generations=2,
        max_steps=3,
        logging_steps=1,
        save_steps=0,
        seed=0,
        mixed_precision="no",
        exact_kl_samples=0,
        eval_steps=0,
    )
    base.update(kw)
    return train(GRPOConfig(**base))


def weights(run: Path, sub: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(run / sub / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, prefs, tmp_path_factory):
    """The 6-step DPO run every interrupted-and-resumed run must equal, bit for bit."""
    out = tmp_path_factory.mktemp("full") / "run"
    dpo(tiny_dir, prefs, out)
    return out


def _all_finite(run: Path) -> None:
    for ckpt in list_checkpoints(run):
        for file in ckpt.glob("*.safetensors"):
            for key, value in load_file(str(file)).items():
                assert torch.isfinite(value).all(), (file, key)


# ------------------------------------------------------------------------------------------------
# Unreadable checkpoints: fall back to the previous intact one
# ------------------------------------------------------------------------------------------------


class _Payload:
    """A pickle that would run code when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    "truncated weights": lambda c, m: _truncate(c / "policy.safetensors"),
    "garbage optimizer state": lambda c, m: (c / "optimizer.pt").write_bytes(b"\x00garbage"),
    "malicious optimizer pickle": lambda c, m: (c / "optimizer.pt").write_bytes(
        pickle.dumps(_Payload(m))
    ),
    "truncated scheduler state": lambda c, m: _truncate(c / "scheduler.pt"),
    "truncated manifest": lambda c, m: _truncate(c / "checkpoint.json"),
    "truncated states": lambda c, m: _truncate(c / "states.json"),
    "missing weights file": lambda c, m: (c / "policy.safetensors").unlink(),
    "truncated rng state": lambda c, m: _truncate(c / "rng-0.pt"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_unreadable_latest_checkpoint_falls_back(
    corruption, tiny_dir, prefs, tmp_path, uninterrupted
):
    run = tmp_path / "run"
    # save_optimizer=all: the older checkpoint keeps its optimizer state, so falling back to it
    # is exact (under the default, last, it resumes with a fresh optimizer and says so)
    dpo(tiny_dir, prefs, run, max_steps=4, save_optimizer="all")
    latest = list_checkpoints(run)[-1]
    assert latest.name == "step-000004"
    marker = tmp_path / "PWNED"
    CORRUPTIONS[corruption](latest, marker)
    with pytest.warns(TetherWarning, match="step-000004 is unreadable.*falling back"):
        dpo(tiny_dir, prefs, run, resume=True, save_optimizer="all")
    assert not marker.exists(), "a pickle in a checkpoint ran code"
    assert_same_weights(weights(run), weights(uninterrupted))
    assert losses(run) == losses(uninterrupted)
    assert (run / "checkpoints" / ".unreadable-step-000004").is_dir()  # set aside, not deleted


def test_no_readable_checkpoint_is_an_error(tiny_dir, prefs, tmp_path):
    run = tmp_path / "run"
    dpo(tiny_dir, prefs, run, max_steps=4)
    for ckpt in list_checkpoints(run):
        _truncate(ckpt / "policy.safetensors")
    with pytest.warns(TetherWarning), pytest.raises(CheckpointError, match="no readable"):
        dpo(tiny_dir, prefs, run, resume=True)


# ------------------------------------------------------------------------------------------------
# Non-finite steps are skipped; non-finite weights are never written
# ------------------------------------------------------------------------------------------------


def _nan_losses(monkeypatch, bad_calls: set[int] | None):
    """Make DPO's step loss NaN on the given calls (None: every call from the third on)."""
    import tether.train.dpo as dpo_mod

    real = dpo_mod.dpo_step_loss
    calls = {"n": 0}

    def patched(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        bad = calls["n"] >= 3 if bad_calls is None else calls["n"] in bad_calls
        return (loss * math.nan if bad else loss), stats

    monkeypatch.setattr(dpo_mod, "dpo_step_loss", patched)


def test_a_nan_step_is_skipped_and_counted(tiny_dir, prefs, tmp_path, monkeypatch):
    _nan_losses(monkeypatch, {3})
    run = tmp_path / "run"
    with pytest.warns(TetherWarning, match="step 3: a non-finite (loss|gradient norm)"):
        dpo(tiny_dir, prefs, run, logging_steps=1)
    rows = {r["step"]: r for r in read_metrics(run) if "loss" in r or "bad_steps" in r}
    assert rows[2]["bad_steps"] == 0 and rows[3]["bad_steps"] == 1 and rows[6]["bad_steps"] == 1
    assert all(math.isfinite(r["loss"]) for s, r in rows.items() if s != 3 and "loss" in r)
    for value in weights(run).values():
        assert torch.isfinite(value).all()
    _all_finite(run)


def test_max_bad_steps_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_dir, prefs, tmp_path, monkeypatch
):
    _nan_losses(monkeypatch, None)  # from step 3 on, every loss is NaN
    run = tmp_path / "run"
    with (
        pytest.warns(TetherWarning),
        pytest.raises(NumericalError, match=r"stopped at step 5: 3 steps in a row.*step-000004"),
    ):
        dpo(tiny_dir, prefs, run, max_bad_steps=3, max_steps=10, keep_last=1)
    # step 4 was skipped, so its checkpoint holds step 2's (finite) weights
    assert [c.name for c in list_checkpoints(run)] == ["step-000004"]
    assert not (run / "final").exists()
    _all_finite(run)


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = torch.nn.Linear(3, 3)
    save_checkpoint(tmp_path, 1, models={"policy": model}, keep_last=1)
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    with pytest.raises(NumericalError, match=r"'policy'.*'weight'.*step-000001"):
        save_checkpoint(tmp_path, 2, models={"policy": model}, keep_last=1)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step-000001"]  # not pruned
    with pytest.raises(NumericalError, match="not writing final/"):
        RunDir(tmp_path, resume=True).write_final(lambda p: None, models={"policy": model})


def test_a_diverging_run_never_writes_non_finite_weights(tiny_dir, prefs, tmp_path):
    """A learning rate far too high: whatever happens, every checkpoint and final/ are finite
    and a checkpoint is kept."""
    run = tmp_path / "run"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TetherWarning)
            dpo(
                tiny_dir,
                prefs,
                run,
                learning_rate=1e5,
                max_grad_norm=None,
                save_steps=1,
                keep_last=1,
                max_bad_steps=2,
                max_steps=8,
            )
    except NumericalError as exc:
        assert "last good checkpoint" in str(exc)
    assert list_checkpoints(run)
    _all_finite(run)
    if (run / "final").exists():
        for value in weights(run).values():
            assert torch.isfinite(value).all()


# ------------------------------------------------------------------------------------------------
# Resume: the same run or a refusal
# ------------------------------------------------------------------------------------------------


def _crash_after_checkpoint(monkeypatch, at_step: int) -> None:
    """Kill the run (an exception) right after the checkpoint of ``at_step`` is written."""
    real = RunDir.save

    def save(self, step, **kwargs):
        path = real(self, step, **kwargs)
        if step == at_step:
            raise KeyboardInterrupt("simulated crash")
        return path

    monkeypatch.setattr(RunDir, "save", save)


def test_logging_window_survives_resume(tiny_dir, prefs, tmp_path, monkeypatch, uninterrupted):
    """logging_steps=3, checkpoint at 4: the line at step 6 averages steps 4–6 either way."""
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_after_checkpoint(m, 4)
        with pytest.raises(KeyboardInterrupt):
            dpo(tiny_dir, prefs, run)
    dpo(tiny_dir, prefs, run, resume=True)
    assert losses(run) == losses(uninterrupted)
    assert_same_weights(weights(run), weights(uninterrupted))


@pytest.mark.parametrize(
    "change, key",
    [
        ({"learning_rate": 1e-2}, "learning_rate"),
        ({"beta": 0.1}, "beta"),
        ({"seed": 7}, "seed"),
        ({"batch_size": 8}, "batch_size"),
        ({"loss_type": "ipo"}, "loss_type"),
        ({"lr_scheduler": "linear", "max_steps": 8}, "lr_scheduler"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_resume_with_a_different_config_is_refused(change, key, tiny_dir, prefs, tmp_path):
    run = tmp_path / "run"
    dpo(tiny_dir, prefs, run, max_steps=2)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(
        ResumeMismatchError, match=rf"(?s)cannot resume.*  {key}: .*resume_override"
    ):
        dpo(tiny_dir, prefs, run, resume=True, **change)
    assert (run / "metrics.jsonl").read_text() == before  # nothing the user had is touched


def test_resume_override_applies_the_new_learning_rate(tiny_dir, prefs, tmp_path):
    run = tmp_path / "run"
    dpo(tiny_dir, prefs, run, max_steps=2, logging_steps=1, learning_rate=1e-3)
    with pytest.warns(TetherWarning, match="learning_rate: 0.001 .saved. → 0.005"):
        dpo(
            tiny_dir,
            prefs,
            run,
            max_steps=4,
            logging_steps=1,
            learning_rate=5e-3,
            resume=True,
            resume_override=True,
        )
    lrs = {r["step"]: r["lr"] for r in read_metrics(run) if "lr" in r}
    assert lrs == {1: 1e-3, 2: 1e-3, 3: 5e-3, 4: 5e-3}


def test_extending_a_decaying_schedule_needs_override_and_then_follows_it(
    tiny_dir, prefs, tmp_path
):
    run = tmp_path / "run"
    args = dict(lr_scheduler="linear", learning_rate=1e-3, logging_steps=1)
    dpo(tiny_dir, prefs, run, max_steps=4, **args)
    with pytest.raises(ResumeMismatchError, match="max_steps: 4 .saved. → 8"):
        dpo(tiny_dir, prefs, run, max_steps=8, resume=True, **args)
    with pytest.warns(TetherWarning, match="max_steps"):
        dpo(tiny_dir, prefs, run, max_steps=8, resume=True, resume_override=True, **args)
    lrs = {r["step"]: r["lr"] for r in read_metrics(run) if "lr" in r}
    # the new 8-step linear decay, evaluated from the resumed step 4 on
    assert lrs[5] == pytest.approx(1e-3 * 3 / 8) and lrs[8] == pytest.approx(0.0)


def test_resume_without_a_checkpoint_says_so(tiny_dir, prefs, tmp_path, uninterrupted):
    run = tmp_path / "run"
    with pytest.warns(TetherWarning, match="has no checkpoint yet: starting from step 0"):
        dpo(tiny_dir, prefs, run, resume=True)
    assert_same_weights(weights(run), weights(uninterrupted))


def test_overwrite_starts_over(tiny_dir, prefs, tmp_path, uninterrupted):
    run = tmp_path / "run"
    dpo(tiny_dir, prefs, run, max_steps=4, learning_rate=1e-2)
    dpo(tiny_dir, prefs, run, overwrite=True)
    assert losses(run) == losses(uninterrupted)
    assert [c.name for c in list_checkpoints(run)] == ["step-000004", "step-000006"]
    assert_same_weights(weights(run), weights(uninterrupted))


def test_final_is_written_atomically(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_final(lambda p: (p.mkdir(), (p / "model.bin").write_text("v1")))

    def fails(path: Path) -> None:
        path.mkdir()
        (path / "model.bin").write_text("half")
        raise OSError(28, "No space left on device", str(path / "model.bin"))

    with pytest.raises(RunDirError, match="No space left on device"):
        run.write_final(fails)
    assert (tmp_path / "run" / "final" / "model.bin").read_text() == "v1"
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "final" in p.name) == ["final"]
    run.close()


# ------------------------------------------------------------------------------------------------
# RL: the KL ceiling and the KL-above-target warning
# ------------------------------------------------------------------------------------------------


def test_kl_max_rolls_every_update_back(tiny_dir, prompts, tmp_path):
    run = tmp_path / "run"
    with pytest.warns(TetherWarning, match="kl_max=1e-12; rolled back"):
        grpo(tiny_dir, prompts, run, kl_max=1e-12)
    rows = [r for r in read_metrics(run) if "kl_max/rolled_back" in r]
    assert len(rows) == 3 and rows[0]["kl/after_update"] > 0.01
    # every update that moved the policy was rolled back (one whose rewards all tie moves nothing)
    assert [r["kl_max/rolled_back"] for r in rows] == [
        float(r["kl/after_update"] > 1e-12) for r in rows
    ]
    initial = load_file(str(tiny_dir / "model.safetensors"))
    final = weights(run)
    for key, value in final.items():
        assert torch.equal(value, initial[key]), key


def test_kl_max_above_the_kl_keeps_the_updates(tiny_dir, prompts, tmp_path):
    run, plain = tmp_path / "run", tmp_path / "plain"
    grpo(tiny_dir, prompts, run, kl_max=1e6)
    grpo(tiny_dir, prompts, plain)
    rows = [r for r in read_metrics(run) if "kl_max/rolled_back" in r]
    assert [r["kl_max/rolled_back"] for r in rows] == [0.0, 0.0, 0.0]
    assert_same_weights(weights(run), weights(plain))


def test_kl_far_above_target_with_a_static_beta_warns(tiny_dir, prompts, tmp_path):
    run = tmp_path / "run"
    with pytest.warns(TetherWarning, match="above 3× kl_target .*β stayed at 0.04"):
        grpo(
            tiny_dir,
            prompts,
            run,
            kl_target=1e-9,
            kl_warn_iterations=2,
            max_steps=3,
            learning_rate=3e-2,
            kl_estimator="k3",
        )


# ------------------------------------------------------------------------------------------------
# SIGKILL (slow): a killed run resumes bit-identically
# ------------------------------------------------------------------------------------------------

_DRIVER = textwrap.dedent(
    """
    import json, sys
    from tether.train.dpo import DPOConfig, train
    train(DPOConfig(**json.loads(sys.argv[1])))
    """
)


def _spawn(args: dict, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _DRIVER, json.dumps(args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the run never reached the kill point"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("when", ["mid-run", "mid-checkpoint"])
def test_sigkill_then_resume_is_bit_identical(when, tiny_dir, prefs, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "TETHER_CACHE": str(tmp_path / "cache")}
    args = dpo_args(tiny_dir, prefs, run, save_steps=1, max_steps=6)
    full = tmp_path / "full"
    subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps({**args, "output_dir": str(full)})],
        env=env,
        check=True,
        capture_output=True,
    )
    proc = _spawn(args, env)
    root = run / "checkpoints"
    if when == "mid-run":
        _kill_when(proc, lambda: (root / "step-000003").is_dir())
    else:
        _kill_when(
            proc,
            lambda: (
                root.is_dir() and any(p.name.startswith(".tmp-step-000004") for p in root.iterdir())
            ),
        )
    assert not (run / "final").exists()
    resumed = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps({**args, "resume": True})],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(weights(run), weights(full))
    assert losses(run) == losses(full)


# ------------------------------------------------------------------------------------------------
# Control trainers: the same guard
# ------------------------------------------------------------------------------------------------


def _nan_value_loss(monkeypatch, bad_calls: set[int] | None):
    import tether.control.algorithms as algorithms

    real = algorithms.value_loss
    calls = {"n": 0}

    def patched(*args, **kwargs):
        loss, extra = real(*args, **kwargs)
        calls["n"] += 1
        bad = bad_calls is None or calls["n"] in bad_calls
        return (loss * math.nan if bad else loss), extra

    monkeypatch.setattr(algorithms, "value_loss", patched)


@pytest.mark.parametrize("algo", ["ppo", "trpo"])
def test_control_skips_non_finite_updates_and_stops_at_max_bad_steps(algo, tmp_path, monkeypatch):
    pytest.importorskip("gymnasium")
    from tether.control.train import ALGORITHMS, train
    from tether.runs.config import load_config

    def config(out, **kw):
        overrides = [f"output_dir={out}", "n_envs=2", "n_steps=32", "max_steps=3", "save_steps=1"]
        overrides += ["eval_episodes=0"] + [f"{k}={v}" for k, v in kw.items()]
        if algo == "ppo":
            overrides += ["batch_size=32", "n_epochs=1"]
        return load_config(ALGORITHMS[algo], None, overrides)

    with monkeypatch.context() as m:
        _nan_value_loss(m, {1})  # one minibatch update of the first rollout
        with pytest.warns(TetherWarning, match="step 1: 1 updates with a non-finite loss"):
            train(config(tmp_path / "once"))
    rows = read_metrics(tmp_path / "once")
    assert [r["bad_steps"] for r in rows] == [1.0, 1.0, 1.0]
    _all_finite(tmp_path / "once")
    with monkeypatch.context() as m:
        _nan_value_loss(m, None)  # every update
        with pytest.warns(TetherWarning), pytest.raises(NumericalError, match="stopped at step 2"):
            train(config(tmp_path / "always", max_bad_steps=2))
    _all_finite(tmp_path / "always")
