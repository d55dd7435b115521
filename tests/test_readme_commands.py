"""Every command in the README's ```bash blocks runs as written (with tiny overrides), so a
broken README fails CI.

The blocks run in order, in one scratch directory that links the repository's ``data/`` and
``recipes/`` (the paths the README uses), so a command may use what an earlier one wrote
(``tether train dpo ...`` then ``tether plot runs/dpo``). Each ``tether`` command goes through
``tether.cli.main``; what makes it tiny is appended after the README's own arguments (the tiny
random model instead of SmolLM2, 2 steps, 4 new tokens, small evaluations): the command line,
the recipe and the data files are the README's. Lines that are not ``tether`` commands are
allowed only from :data:`NOT_RUN`, each with the reason and the test that covers it instead.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tether.cli import main
from tether.runs.config import _config_fields
from tether.runs.registry import get_trainer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EMBEDDED = "smollm2-135m-instruct"

NOT_RUN = {
    "git": "installation (CI clones the repository itself)",
    "make": "make install/test/demo are what CI and `make demo` run",
    "source": "activating the venv",
    "pip": "installation",
    "torchrun": "multi-process launch: tests/train/test_distributed.py runs 2 gloo processes",
    "accelerate": "multi-process launch: tests/train/test_distributed.py and test_recipes.py",
    "tensorboard": "a viewer, not tether",
    "mlflow": "a viewer, not tether",
    "wandb": "a viewer, not tether",
    "trackio": "a viewer, not tether",
    "python": "README python snippets are run by tests/test_readme.py (`python -c` lines run here)",
}
"""First words of README command lines that this test does not run, and why."""

LAB_RUNS = "tether lab overopt runs the lab on SmolLM2 and MiniLM: tests/lab run it end to end"

TRAIN_TINY = {
    "max_steps": "2",
    "batch_size": "2",
    "gradient_accumulation_steps": "1",
    "save_steps": "0",
    "logging_steps": "1",
    "max_new_tokens": "4",
    "num_generations": "2",
    "mixed_precision": "no",
    "eval_num_prompts": "2",
    "eval_samples_per_prompt": "2",
    "eval_semantic": "false",
    "eval_capability_passages": "4",
    "eval_offtask_num": "2",
    "normalization_samples": "8",
    "exact_kl_samples": "1",
}
"""Overrides that make any trainer tiny (only the fields the trainer has are appended)."""

CONTROL_TINY = ["n_envs=2", "n_steps=32", "batch_size=32", "n_epochs=1", "max_steps=2"]
CONTROL_TINY += ["eval_episodes=1", "total_timesteps=0"]


def readme_commands(text: str) -> list[list[str]]:
    """The command lines of every ```bash block, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def _set(argv: list[str], key: str) -> str | None:
    """The value a ``key=value`` argument in ``argv`` sets, if any."""
    for a in argv:
        if a.startswith(key + "="):
            return a.split("=", 1)[1]
    return None


def _replace_option(argv: list[str], option: str, value: str) -> list[str]:
    out = list(argv)
    if option in out:
        out[out.index(option) + 1] = value
    else:
        out += [option, value]
    return out


def tiny_argv(argv: list[str], tiny: Path) -> list[str] | None:
    """The README command ``argv`` (``tether`` dropped) made tiny; None: not run here."""
    command = argv[0] if argv else ""
    if command == "train" and not {"--help-config", "--print-config", "--help"} & set(argv):
        cls, _ = get_trainer(argv[1])
        fields = {f.name for f in _config_fields(cls)}
        extra = [f"{k}={v}" for k, v in TRAIN_TINY.items() if k in fields]
        model = _set(argv, "model")
        if model is None or model == EMBEDDED:  # a model the README trained earlier stays
            extra.append(f"model={tiny}")
        if argv[1] == "trpo":  # the natural gradient of the full tiny model is slow on 2 cores
            extra.append("peft={r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}")
        return [*argv, *extra]
    if command == "bon":
        out = _replace_option(argv, "--model", str(tiny))
        for option, value in (("--limit", "2"), ("--n", "2"), ("--max-new-tokens", "4")):
            out = _replace_option(out, option, value)
        return out
    if command in ("generate", "eval"):
        out = [str(tiny) if a == EMBEDDED else a for a in argv]
        size = ("--limit", "2") if command == "generate" else ("--num-prompts", "2")
        for option, value in (size, ("--max-new-tokens", "4")):
            out = _replace_option(out, option, value)
        if command == "eval":
            out = _replace_option(out, "--samples-per-prompt", "2")
            out += [] if "--no-semantic" in out else ["--no-semantic"]
        return out
    if command == "control" and argv[1] != "eval":
        from tether.control.config import CONFIGS

        fields = {f.name for f in _config_fields(CONFIGS[argv[1]])}
        return [*argv, *(o for o in CONTROL_TINY if o.split("=", 1)[0] in fields)]
    if command == "control":
        return _replace_option(argv, "--episodes", "1")
    if command == "lab" and "--help-config" not in argv:
        return None
    return list(argv)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    for name in ("data", "recipes"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    # the trackers the README names write offline into the run; nothing reaches a network
    for name in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "TRACKIO_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    for name in ("CONFIG", "CACHE", "DATA"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / "home" / f"wandb-{name.lower()}"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_readme_command_lines_are_all_known():
    commands = readme_commands(README.read_text())
    assert len(commands) > 20
    unknown = [c for c in commands if c[0] not in ("tether", "time") and c[0] not in NOT_RUN]
    assert not unknown, f"README commands this test does not know how to run: {unknown}"


def test_every_readme_command_runs(scratch, tiny_dir, capsys):
    ran, skipped = [], []
    for argv in readme_commands(README.read_text()):
        if argv[0] == "time":  # `time tether ...`: the command is what runs
            argv = argv[1:]
        if argv[:2] == ["python", "-c"]:
            done = subprocess.run(
                [sys.executable, "-c", argv[2]], cwd=scratch, capture_output=True, text=True
            )
            assert done.returncode == 0, f"README command failed: {shlex.join(argv)}\n{done.stderr}"
            ran.append(argv)
            continue
        if argv[0] != "tether":
            skipped.append((argv, NOT_RUN[argv[0]]))
            continue
        tiny = tiny_argv(argv[1:], tiny_dir)
        if tiny is None:
            skipped.append((argv, LAB_RUNS))
            continue
        try:
            code = main(tiny)
        except SystemExit as stop:  # --help, --version: argparse exits
            code = stop.code
        captured = capsys.readouterr()
        assert code == 0, (
            f"README command failed: {shlex.join(argv)}\nran as: {shlex.join(tiny)}\n"
            f"{captured.err[-3000:]}"
        )
        ran.append(argv)
    assert len(ran) >= 20, [shlex.join(a) for a in ran]
    # every tether subcommand the README shows ran at least once
    shown = {a[1] for a in ran if a[0] == "tether"}
    assert {"train", "plot", "report", "bon", "control", "env"} <= shown
    assert {"generate", "eval", "export"} <= shown
