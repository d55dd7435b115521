"""Run directory: config.yaml, metrics.jsonl + TensorBoard, resume truncation, progress bar."""

from __future__ import annotations

import io
import json
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn

from tether.runs import Progress, RunConfig, RunDir, load_config, option, read_metrics
from tether.runs.rundir import CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR


@dataclass
class LoopConfig(RunConfig):
    beta: float = option(0.1, help="KL coefficient.")


class FakeAccelerator:
    """The two members of ``accelerate.Accelerator`` a RunDir uses, for a non-main process."""

    is_main_process = False
    process_index = 1
    num_processes = 2

    def wait_for_everyone(self) -> None:
        return None


def lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def tensorboard_scalars(run, tag: str) -> list[tuple[int, float]]:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(run / TENSORBOARD_DIR))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_metrics_jsonl_and_tensorboard(tmp_path):
    run = tmp_path / "run"
    cfg = LoopConfig(output_dir=str(run), beta=0.3)
    with RunDir.from_config(cfg) as rd:
        rd.log(1, {"loss": 1.5, "kl/mean": torch.tensor(0.25), "n": np.int64(7), "ok": True})
        rd.log(2, {"loss": math.nan, "kl/mean": math.inf, "n": 8, "ok": False})
        assert (run / METRICS_FILE).read_text().count("\n") == 2  # flushed on every line
    assert load_config(LoopConfig, run / CONFIG_FILE) == cfg
    first, second = lines(run)
    assert first["step"] == 1 and isinstance(first["time"], float)
    assert first["loss"] == 1.5 and first["kl/mean"] == 0.25 and first["n"] == 7
    assert first["ok"] == 1
    assert second["loss"] is None and second["kl/mean"] is None  # non-finite → null
    assert read_metrics(run)[1]["n"] == 8
    assert tensorboard_scalars(run, "kl/mean")[0] == (1, 0.25)
    assert tensorboard_scalars(run, "loss")[0] == (1, 1.5)
    assert list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))


def test_without_tensorboard_metrics_still_go_to_jsonl(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with RunDir(tmp_path) as rd, pytest.warns(UserWarning, match="tensorboard is not installed"):
        rd.log(1, {"a": 1.0})
    assert lines(tmp_path)[0]["a"] == 1.0
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_bad_metrics_are_errors(tmp_path):
    with RunDir(tmp_path) as rd:
        with pytest.raises(TypeError, match=r"metric 'phase' must be a number, got str 'eval'"):
            rd.log(1, {"phase": "eval"})
        with pytest.raises(ValueError, match=r"metric 'v' is a tensor of shape \(2,\)"):
            rd.log(1, {"v": torch.ones(2)})
        with pytest.raises(ValueError, match=r"metric names \['step'\] are reserved"):
            rd.log(1, {"step": 3})
        with pytest.raises(ValueError, match="step must be an int ≥ 0"):
            rd.log(-1, {"a": 1})


def test_existing_run_needs_resume(tmp_path):
    with RunDir(tmp_path) as rd:
        rd.log(1, {"a": 1.0})
    with pytest.raises(FileExistsError, match="already holds a run .* set resume=true"):
        RunDir(tmp_path)


def test_resume_drops_metrics_after_checkpoint(tmp_path):
    model = nn.Linear(2, 2)
    with RunDir(tmp_path) as rd:
        for step in range(1, 8):
            rd.log(step, {"loss": float(step)})
            if step == 4:
                rd.save(step, models={"m": model})
    with (tmp_path / METRICS_FILE).open("a") as fh:
        fh.write('{"step": 8, "lo')  # a line cut short by the crash
    # TensorBoard orders event files by name: second, host, pid, then a per-process counter
    # compared as text ("10" < "9"). A resumed run starts in a later second; so does this one.
    time.sleep(1.05)

    with RunDir(tmp_path, resume=True) as rd:
        with pytest.raises(RuntimeError, match="must call restore"):
            rd.log(5, {"loss": 50.0})
        step, _ = rd.restore(models={"m": model})
        assert step == 4
        assert [r["step"] for r in lines(tmp_path)] == [1, 2, 3, 4]
        for step in range(5, 7):
            rd.log(step, {"loss": 10.0 * step})
        with pytest.raises(RuntimeError, match="before the first log"):
            rd.restore(models={"m": model})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 50.0),
        (6, 60.0),
    ]
    # TensorBoard hides the purged events of the first attempt after step 4
    assert tensorboard_scalars(tmp_path, "loss")[-2:] == [(5, 50.0), (6, 60.0)]


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    with RunDir(tmp_path) as rd:
        rd.log(1, {"a": 1.0})
    with RunDir(tmp_path, resume=True) as rd:
        assert rd.restore(models={}) == (0, {})
        assert (tmp_path / METRICS_FILE).read_text() == ""
        rd.log(1, {"a": 2.0})
    assert [r["a"] for r in read_metrics(tmp_path)] == [2.0]


def test_read_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl not found"):
        read_metrics(tmp_path)
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: malformed metrics line"):
        read_metrics(tmp_path)
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n{"step": 2, "a"')
    with pytest.warns(UserWarning, match="truncated last line"):
        assert read_metrics(tmp_path) == [{"step": 1}]


def test_only_the_main_process_writes(tmp_path):
    run = tmp_path / "run"
    with RunDir(run, FakeAccelerator(), config=LoopConfig()) as rd:
        rd.log(1, {"a": 1.0})
    assert not run.exists()


def test_progress_prints_plain_lines_off_a_terminal(capsys):
    """No bar off a terminal, but one plain line per update with metrics (a log under nohup or CI
    says what the run is doing); none for an update without metrics, none off the main process."""
    with Progress(total=5, metrics=["loss"]) as bar:  # pytest captures stdout: not a TTY
        assert not bar.enabled and bar.plain
        bar.update(1, {"loss": 0.5, "other": 1.0})
        bar.update(2)
        bar.update(3, {"loss": 0.25})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("train step 1/5  s/step ") and "ETA " in lines[0]
    assert lines[0].endswith("loss 0.5") and "other" not in lines[0]
    assert lines[1].startswith("train step 3/5") and lines[1].endswith("loss 0.25")
    console = Console(file=io.StringIO(), force_terminal=True)
    quiet = Progress(total=5, console=console, accelerator=FakeAccelerator())
    assert not quiet.enabled and not quiet.plain
    quiet.update(1, {"loss": 0.5})
    assert capsys.readouterr().out == ""


def test_progress_notes_and_excluded_stages(capsys, monkeypatch):
    """A note is its own plain line; a one-off stage left out by ``exclude`` does not count in
    s/step (here: a 100 s evaluation before a 2 s step)."""
    clock = iter([0.0, 102.0])
    monkeypatch.setattr("tether.runs.progress.time.perf_counter", lambda: next(clock))
    with Progress(total=5) as bar:
        bar.note("eval step 0: 100.0 s")
        bar.exclude(100.0)
        bar.update(1, {"loss": 0.5})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "eval step 0: 100.0 s"
    assert lines[1].startswith("train step 1/5  s/step 2  ETA 0m08s")


def test_progress_shows_step_and_chosen_metrics():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=150)
    with Progress(total=10, initial=2, metrics=["loss", "kl/mean"], console=console) as bar:
        assert bar.enabled
        bar.update(3, {"kl/mean": 0.0123456, "loss": 1.5, "ignored": 9.0})
        bar.update(4, {"loss": math.nan})
    text = out.getvalue()
    assert "4/10" in text
    assert "loss nan  kl/mean 0.01235" in text
    assert "ignored" not in text
