"""``tether plot`` and ``tether train`` dispatch, and the plot helpers behind them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

import pytest

from tether.cli import main
from tether.runs import TRAINERS, RunConfig, RunDir, load_config, option, register_trainer
from tether.runs.plot import metric_group, plot_run
from tether.runs.registry import get_trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class OptimConfig:
    lr: float = option(1e-5, help="Learning rate.")


@dataclass
class DummyConfig(RunConfig):
    beta: float = option(0.1, help="KL coefficient.")
    loss: Literal["sigmoid", "ipo"] = option("sigmoid", help="Loss variant.")
    optim: OptimConfig = option(OptimConfig(), help="Optimizer settings.")


def dummy_train(cfg: DummyConfig) -> None:
    """A "trainer": logs a decaying loss, a rising reward and a KL; checkpoints at the end."""
    with RunDir.from_config(cfg) as run:
        step, _ = run.restore(models={})
        while step < cfg.max_steps:
            step += 1
            if step % cfg.logging_steps == 0:
                run.log(
                    step,
                    {
                        "loss": 1.0 / step,
                        "reward/mean": math.log(step),
                        "kl/mean": cfg.beta * step,
                        "beta": cfg.beta,
                        "lr": cfg.optim.lr,
                    },
                )
            if step % cfg.save_steps == 0 or step == cfg.max_steps:
                run.save(step, models={}, states={"beta": cfg.beta})


@pytest.fixture
def dummy_trainer(monkeypatch):
    monkeypatch.setitem(TRAINERS, "dummy", lambda: (DummyConfig, dummy_train))


def write_run(tmp_path):
    run = tmp_path / "run"
    dummy_train(DummyConfig(output_dir=str(run), max_steps=20, logging_steps=2))
    return run


# --------------------------------------------------------------------------------------------
# tether train
# --------------------------------------------------------------------------------------------


def test_train_dispatch_with_yaml_and_overrides(tmp_path, dummy_trainer, capsys):
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {run}\nmax_steps: 6\nlogging_steps: 1\noptim:\n  lr: 1e-4\n")
    argv = ["train", "dummy", "beta=0.5", "--config", str(recipe), "loss=ipo", "optim.lr=2e-5"]
    assert main(argv) == 0
    cfg = load_config(DummyConfig, run / "config.yaml")
    assert (cfg.beta, cfg.loss, cfg.optim.lr, cfg.max_steps) == (0.5, "ipo", 2e-5, 6)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["kl/mean"] == pytest.approx(3.0)

    # resuming without the overrides the run was trained with is refused, naming each change
    assert main(["train", "dummy", "-c", str(recipe), "resume=true", "max_steps=8"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "beta: 0.5 (saved) → 0.1 (now)" in err
    assert "optim.lr: 2e-05 (saved) → 0.0001 (now)" in err and "Traceback" not in err
    # resume=true with the same config continues from the step-6 checkpoint: steps 7, 8
    same = ["beta=0.5", "loss=ipo", "optim.lr=2e-5"]
    argv = ["train", "dummy", "-c", str(recipe), *same, "resume=true", "max_steps=8"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["beta"]) for r in records] == [(s, 0.5) for s in range(1, 9)]
    assert load_config(DummyConfig, run / "config.yaml").max_steps == 8
    # resume_override=true applies the new values from the resumed step
    argv = ["train", "dummy", "-c", str(recipe), "resume=true", "resume_override=true"]
    assert main([*argv, "max_steps=10"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["beta"] for r in records[-2:]] == [0.1, 0.1] and records[-1]["step"] == 10


def test_train_print_and_help_config(tmp_path, dummy_trainer, capsys):
    assert main(["train", "dummy", "--print-config", "beta=0.25", "optim.lr=3e-4"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"# {__name__}.DummyConfig\n")
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_config(DummyConfig, tmp_path / "printed.yaml") == DummyConfig(
        beta=0.25, optim=OptimConfig(lr=3e-4)
    )
    assert main(["train", "dummy", "--help-config"]) == 0
    text = capsys.readouterr().out
    assert "  beta: float = 0.1\n      KL coefficient." in text
    assert "  optim.lr: float = 1.0e-05\n      Learning rate." in text


def test_train_errors(tmp_path, dummy_trainer, capsys):
    assert main(["train", "dumy"]) == 2
    err = capsys.readouterr().err
    assert "tether train: error: unknown algorithm 'dumy'; did you mean 'dummy'?" in err
    assert "known algorithms: " in err and "dummy" in err

    assert main(["train", "dummy", "bta=0.5"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'bta' in override 'bta=0.5'; did you mean 'beta'?" in err

    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss: dpo\n")
    assert main(["train", "dummy", "--config", str(recipe)]) == 2
    assert f"invalid value for 'loss' in {recipe}: expected one of" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["train", "dummy", "--bogus"])


def test_registry(monkeypatch):
    monkeypatch.setattr("tether.runs.registry.TRAINERS", {})
    register_trainer("dummy", lambda: (DummyConfig, dummy_train))
    assert get_trainer("dummy") == (DummyConfig, dummy_train)
    with pytest.raises(ValueError, match="already registered"):
        register_trainer("dummy", lambda: (DummyConfig, dummy_train))
    with pytest.raises(ValueError, match="must be letters, digits"):
        register_trainer("a b", lambda: (DummyConfig, dummy_train))


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "group"),
    [
        ("reward/mean", "reward"),
        ("rm_score", "reward"),
        ("eval/returns", "reward"),
        ("kl/mean", "kl"),
        ("policy/kl_k3", "kl"),
        ("beta", "beta"),
        ("objective/kl_coef", "beta"),
        ("loss", "loss"),
        ("loss/policy", "loss"),
        ("eval/accuracy", "eval"),
        ("grad_norm", "grad_norm"),
    ],
)
def test_metric_group(key, group):
    assert metric_group(key) == group


def test_plot_run_writes_png(tmp_path):
    run = write_run(tmp_path)
    with (run / "metrics.jsonl").open("a") as fh:  # nulls and non-numeric values are handled
        fh.write(json.dumps({"step": 22, "time": 0.0, "loss": None, "phase": "eval"}) + "\n")
    out = plot_run(run)
    assert out == run / "metrics.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_cli(tmp_path, capsys):
    run = write_run(tmp_path)
    out = tmp_path / "figs" / "kl.png"
    assert main(["plot", str(run), "--out", str(out), "--keys", "kl/mean, lr"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes().startswith(PNG_MAGIC)

    assert main(["plot", str(run), "--keys", "kl/maen"]) == 2
    assert "no numeric metric 'kl/maen'" in (err := capsys.readouterr().err)
    assert "did you mean 'kl/mean'?" in err

    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1, "phase": "x"}\n')
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "holds no numeric metrics" in capsys.readouterr().err


def test_train_help_lists_every_algorithm_without_loading_torch():
    """`tether train --help` lists each algorithm with its one line; building the parser (and
    so `tether --help`) imports neither torch nor a trainer."""
    import subprocess
    import sys

    from tether.runs.registry import SUMMARIES, TRAINERS

    out = subprocess.run(
        [sys.executable, "-m", "tether.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in TRAINERS:
        if name in SUMMARIES:  # (a test may register one without a summary)
            assert f"  {name}" in out and SUMMARIES[name] in out, name
    probe = (
        "import sys; from tether.cli import build_parser; build_parser(); "
        "heavy = ('torch', 'transformers', 'tether.train.dpo'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
