"""User mistakes at the command line: each ends in a few lines naming the place and what was
expected, exit status 2, no traceback (``--debug`` / TETHER_DEBUG=1 shows it), and nothing heavy
is loaded before the mistake is found."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tether.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading any model is a test failure: the mistake must be found before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr("tether.train.common.load_policy", refuse)
    monkeypatch.setattr(
        "tether.rewards.model.RewardModel.from_pretrained_backbone", classmethod(refuse)
    )


@pytest.fixture
def prefs(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": " good", "rejected": " bad"} for i in range(16)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}"}) for i in range(8)))
    return path


def run_cli(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def assert_clean(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.count("\n") <= 8, err  # a few lines, not a stack
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def _existing_run(tmp_path: Path) -> Path:
    run = tmp_path / "old"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / "checkpoint.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1, "time": 0, "loss": 1.0}\n')
    return run


def _dir(tmp_path: Path) -> Path:
    """An empty directory (a directory of data files would be a dataset)."""
    path = tmp_path / "a-dir"
    path.mkdir()
    return path


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


# (name, argv builder, fragments the message must hold)
CASES = [
    ("unknown algorithm", lambda t, d, p: ["train", "dpoo"], ["unknown algorithm 'dpoo'"]),
    (
        "unknown option",
        lambda t, d, p: ["train", "dpo", "learning_rte=1e-5"],
        ["unknown key 'learning_rte'", "learning_rate"],
    ),
    (
        "wrong type",
        lambda t, d, p: ["train", "dpo", "batch_size=eight"],
        ["'batch_size'", "expected an int"],
    ),
    (
        "negative max_grad_norm",
        lambda t, d, p: ["train", "dpo", "max_grad_norm=-1"],
        ["max_grad_norm"],
    ),
    (
        "negative warmup",
        lambda t, d, p: ["train", "grpo", "warmup_steps=-3"],
        ["warmup_steps"],
    ),
    ("zero temperature", lambda t, d, p: ["train", "grpo", "temperature=0"], ["temperature"]),
    ("top_p above 1", lambda t, d, p: ["train", "ppo", "top_p=1.5"], ["top_p"]),
    (
        "missing recipe",
        lambda t, d, p: ["train", "dpo", "-c", t / "nope.yaml"],
        ["nope.yaml", "not found"],
    ),
    (
        "recipe not YAML",
        lambda t, d, p: ["train", "dpo", "-c", _yaml(t, "a: [1, 2\n")],
        ["cannot parse config file"],
    ),
    (
        "recipe not a mapping",
        lambda t, d, p: ["train", "dpo", "-c", _yaml(t, "- a\n- b\n")],
        ["expected a mapping"],
    ),
    (
        "missing train_data",
        lambda t, d, p: ["train", "dpo", f"output_dir={t / 'r'}"],
        ["train_data is required"],
    ),
    (
        "train_data not found",
        lambda t, d, p: ["train", "dpo", f"train_data={t / 'nope.jsonl'}", f"output_dir={t / 'r'}"],
        ["train_data", "nope.jsonl", "not found"],
    ),
    (
        "train_data a directory but no dataset",
        lambda t, d, p: ["train", "reward", f"train_data={_dir(t)}", f"output_dir={t / 'r'}"],
        ["train_data", "a directory that is neither a saved dataset"],
    ),
    (
        "eval_data not found",
        lambda t, d, p: [
            "train",
            "dpo",
            f"train_data={d}",
            f"eval_data={t / 'no.jsonl'}",
            f"output_dir={t / 'r'}",
        ],
        ["eval_data", "not found"],
    ),
    (
        "missing prompts",
        lambda t, d, p: ["train", "grpo", f"output_dir={t / 'r'}"],
        ["prompts is required"],
    ),
    (
        "prompts not found",
        lambda t, d, p: ["train", "online_dpo", f"prompts={t / 'p.csv'}", f"output_dir={t / 'r'}"],
        ["prompts", "p.csv", "not found"],
    ),
    (
        "output_dir is a file",
        lambda t, d, p: ["train", "dpo", f"train_data={d}", f"output_dir={_file(t)}"],
        ["is a file, expected a directory"],
    ),
    (
        "run exists without resume",
        lambda t, d, p: ["train", "dpo", f"train_data={d}", f"output_dir={_existing_run(t)}"],
        ["already holds a run", "resume=true", "overwrite=true"],
    ),
    (
        "resume and overwrite",
        lambda t, d, p: ["train", "dpo", "resume=true", "overwrite=true"],
        ["resume=true", "overwrite=true"],
    ),
    (
        "resume_override without resume",
        lambda t, d, p: ["train", "grpo", "resume_override=true"],
        ["resume_override=true", "resume=true"],
    ),
    (
        "unknown control algorithm",
        lambda t, d, p: ["control", "sac"],
        ["unknown 'sac'"],
    ),
    (
        "control eval of a non-run",
        lambda t, d, p: ["control", "eval", str(t)],
        ["not a tether control run"],
    ),
    (
        "plot of a non-run",
        lambda t, d, p: ["plot", str(t)],
        ["metrics.jsonl", "not found"],
    ),
    (
        "report of a non-run",
        lambda t, d, p: ["report", str(t / "nothing")],
        ["nothing"],
    ),
    (
        "bon prompts missing",
        lambda t, d, p: ["bon", "--model", "x", "--prompts", str(t / "none.jsonl")],
        ["none.jsonl"],
    ),
    (
        "lab recipe missing",
        lambda t, d, p: ["lab", "overopt", "-c", str(t / "lab.yaml")],
        ["lab.yaml", "not found"],
    ),
]


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, argv, fragments", CASES, ids=[c[0] for c in CASES])
def test_cli_mistake_is_a_clean_error(
    name, argv, fragments, tmp_path, prefs, prompts, capsys, no_model_load, monkeypatch
):
    monkeypatch.delenv("TETHER_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(argv(tmp_path, prefs, prompts), capsys)
    assert_clean(code, err, *fragments)


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    argv = ["train", "dpo", f"train_data={tmp_path / 'nope.jsonl'}", f"output_dir={tmp_path}/r"]
    monkeypatch.delenv("TETHER_DEBUG", raising=False)
    with pytest.raises(Exception, match="not found"):
        main(["--debug", *argv])
    with pytest.raises(Exception, match="not found"):
        main([*argv, "--debug"])  # anywhere on the line
    monkeypatch.setenv("TETHER_DEBUG", "1")
    with pytest.raises(Exception, match="not found"):
        main(argv)
    monkeypatch.setenv("TETHER_DEBUG", "0")
    assert main(argv) == 2


def test_a_locked_run_directory_is_refused(tmp_path, prefs, capsys, no_model_load):
    """A second run into a directory another process is writing is refused, naming that
    process; the lock goes with the process (nothing stale after a kill)."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from tether.runs import RunDir
                rd = RunDir({str(run)!r})
                print("locked", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = run_cli(["train", "dpo", f"train_data={prefs}", f"output_dir={run}"], capsys)
        assert_clean(code, err, "is being written by another run", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed: its lock went with it
    from tether.runs import RunDir

    RunDir(run).close()


def test_tether_warnings_are_one_line(tmp_path, capsys, monkeypatch):
    """A TetherWarning reaches the user as `tether: warning: ...`, without a source line."""
    import warnings

    from tether import cli
    from tether.errors import TetherWarning

    def fake(args):
        warnings.warn("something to know", TetherWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "_env", fake)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["env"]) == 0
    assert "tether: warning: something to know\n" in capsys.readouterr().err


def test_os_error_reaching_the_cli_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from tether import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(cli, "_env", full)
    code = main(["env"])
    err = capsys.readouterr().err
    assert_clean(code, err, "No space left on device", "free some space")


def test_cli_subprocess_has_no_traceback(tmp_path):
    """The installed entry point, as a user runs it."""
    env = {**os.environ, "TETHER_DEBUG": ""}
    out = subprocess.run(
        [sys.executable, "-m", "tether.cli", "train", "dpo", f"train_data={tmp_path}/x.jsonl"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "train_data" in out.stderr


@pytest.mark.parametrize("algo", ["grpo", "online_dpo"])
def test_a_rollout_longer_than_the_context_is_refused(algo, tiny_dir, prompts, tmp_path, capsys):
    """max_prompt_length + max_new_tokens past the model's 1024 positions: named, exit 2."""
    argv = [
        "train",
        algo,
        f"model={tiny_dir}",
        f"prompts={prompts}",
        f"output_dir={tmp_path / 'r'}",
        "max_prompt_length=1000",
        "max_new_tokens=100",
    ]
    code, err = run_cli(argv, capsys)
    assert_clean(code, err, "max_prompt_length (1000) + max_new_tokens (100) = 1100", "1024")
