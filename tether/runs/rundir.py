"""The run directory: resolved config, metrics log, TensorBoard events and checkpoints.

Layout of ``<run>/``::

    config.yaml      the resolved config (what ``load_config`` reads back to an equal object)
    metrics.jsonl    one JSON object per ``log`` call: {"step": 12, "time": 1.7e9, "kl/mean": ...}
    tb/              the same scalars as TensorBoard events
    checkpoints/     step-000500/, step-001000/, latest  (see ``tether.runs.checkpoint``)

A trainer's skeleton::

    run = RunDir.from_config(cfg, accelerator)
    step, states = run.restore(models={"policy": policy}, optimizer=opt, scheduler=sched)
    if states:
        controller.load_state_dict(states["kl_controller"])
    while step < cfg.max_steps:
        ...; step += 1
        if step % cfg.logging_steps == 0:
            run.log(step, {"loss": loss, "kl/mean": kl, "beta": controller.beta})
        if step % cfg.save_steps == 0 or step == cfg.max_steps:
            run.save(step, models={"policy": policy}, optimizer=opt, scheduler=sched,
                     states={"kl_controller": controller.state_dict()})
    run.close()

``step`` counts completed optimizer steps: metrics logged at ``step`` and a checkpoint saved at
``step`` both describe the state after that many steps, so a run resumed from the checkpoint at
step s drops the metric lines with step > s and continues with step s + 1.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from tether.runs.checkpoint import (
    StateDict,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from tether.runs.config import RunConfig, save_config

if TYPE_CHECKING:
    from accelerate import Accelerator
    from torch.utils.tensorboard import SummaryWriter

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
RESERVED_METRIC_KEYS = ("step", "time")
"""Keys every metrics line carries; a metric may not use them."""
TENSORBOARD_FLUSH_SECS = 30
"""How often TensorBoard events reach the disk (metrics.jsonl is flushed on every line)."""


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``<run_dir>/metrics.jsonl`` in order (null metrics come back as ``None``).

    A malformed last line (a write cut short by a crash) is skipped with a warning; a malformed
    line elsewhere is an error naming the file and line number.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a tether run directory?")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a JSON object with an integer 'step'")
        except ValueError as exc:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: skipping a truncated last line", stacklevel=2)
                continue
            raise ValueError(f"{path}:{number}: malformed metrics line: {exc}") from None
        records.append(record)
    return records


def _truncate_metrics(path: Path, keep_through: int) -> None:
    """Keep only the lines of ``path`` with step ≤ ``keep_through``, rewriting it atomically;
    unreadable lines (a write cut short by a crash) are dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            if record["step"] <= keep_through:
                kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _scalar(key: str, value: Any) -> int | float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            shape = tuple(value.shape)
            raise ValueError(f"metric {key!r} is a tensor of shape {shape}, not a single value")
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r}")


class RunDir:
    """A run directory, with a metrics logger and checkpoint helpers.

    Only the main process (``accelerator.is_main_process``; always, without an accelerator)
    writes; every process may call every method.

    Args:
        path: the run directory (created if needed).
        accelerator: the run's ``accelerate.Accelerator``, if any.
        config: the resolved config, written to ``config.yaml`` (overwritten on resume, so it
            holds the settings the run continued with).
        resume: continue the run already in ``path``; without it, a directory that already holds
            metrics or checkpoints is an error rather than being mixed into.
        keep_last: checkpoints kept by :meth:`save` (``None``: all).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        accelerator: Accelerator | None = None,
        *,
        config: Any = None,
        resume: bool = False,
        keep_last: int | None = 2,
    ) -> None:
        self.path = Path(path)
        self.accelerator = accelerator
        self.resume = resume
        self.keep_last = keep_last
        self.is_main_process = accelerator is None or accelerator.is_main_process
        self._restored_step: int | None = None
        self._metrics: IO[str] | None = None
        self._tensorboard: SummaryWriter | None = None
        if not resume and ((self.path / METRICS_FILE).exists() or list_checkpoints(self.path)):
            raise FileExistsError(
                f"{self.path} already holds a run (metrics.jsonl or checkpoints/); set "
                "resume=true to continue it, or choose another output_dir"
            )
        if self.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            if config is not None:
                save_config(config, self.path / CONFIG_FILE)
        if accelerator is not None:
            accelerator.wait_for_everyone()

    @classmethod
    def from_config(cls, config: RunConfig, accelerator: Accelerator | None = None) -> RunDir:
        """The run directory ``config.output_dir``, resuming if ``config.resume``."""
        return cls(
            config.output_dir,
            accelerator,
            config=config,
            resume=config.resume,
            keep_last=config.keep_last,
        )

    # -- checkpoints -----------------------------------------------------------------------------

    def restore(
        self,
        *,
        models: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
    ) -> tuple[int, dict[str, Any]]:
        """Load the latest checkpoint when resuming; return ``(step, states)``.

        Returns ``(0, {})`` for a fresh run (not resuming, or resuming a run with no checkpoint
        yet). When resuming, metric lines (and TensorBoard events) after the restored step are
        dropped, so the continued run logs no step twice. Call it before the first :meth:`log`.
        """
        if self._metrics is not None:
            raise RuntimeError("RunDir.restore() must be called before the first log()")
        step, states = 0, {}
        ckpt = latest_checkpoint(self.path) if self.resume else None
        if ckpt is not None:
            step, states = load_checkpoint(
                ckpt,
                models=models,
                optimizer=optimizer,
                scheduler=scheduler,
                accelerator=self.accelerator,
            )
        self._restored_step = step if ckpt is not None else -1
        if self.resume and self.is_main_process:
            _truncate_metrics(self.path / METRICS_FILE, self._restored_step)
        return step, states

    def save(
        self,
        step: int,
        *,
        models: Mapping[str, nn.Module | StateDict],
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        states: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save a checkpoint for ``step`` (see :func:`tether.runs.checkpoint.save_checkpoint`)."""
        return save_checkpoint(
            self.path,
            step,
            models=models,
            optimizer=optimizer,
            scheduler=scheduler,
            states=states,
            accelerator=self.accelerator,
            keep_last=self.keep_last,
        )

    # -- metrics ---------------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step", "time", **metrics}`` to metrics.jsonl (flushed) and to TensorBoard.

        Values may be numbers, 1-element tensors or numpy scalars; NaN/inf are written as
        ``null`` to the JSON (and as they are to TensorBoard).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int ≥ 0, got {step!r}")
        if self.resume and self._restored_step is None:
            raise RuntimeError(
                "a resumed RunDir must call restore() before log(), so that metrics logged "
                "after the checkpoint are dropped first"
            )
        clash = [k for k in RESERVED_METRIC_KEYS if k in metrics]
        if clash:
            raise ValueError(f"metric names {clash} are reserved in metrics.jsonl")
        values = {key: _scalar(key, value) for key, value in metrics.items()}
        if not self.is_main_process:
            return
        now = time.time()
        record: dict[str, Any] = {"step": step, "time": now}
        record.update({k: v if math.isfinite(v) else None for k, v in values.items()})
        metrics_file, tensorboard = self._writers()
        metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        metrics_file.flush()
        if tensorboard is not None:
            for key, value in values.items():
                tensorboard.add_scalar(key, value, global_step=step, walltime=now)

    def _writers(self) -> tuple[IO[str], SummaryWriter | None]:
        """Open metrics.jsonl and the TensorBoard writer on the first log (after restore())."""
        if self._metrics is None:
            self._metrics = (self.path / METRICS_FILE).open("a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the `tensorboard` package is missing
                warnings.warn(
                    "tensorboard is not installed: metrics go to metrics.jsonl only "
                    "(pip install tensorboard)",
                    stacklevel=3,
                )
            else:
                purge = None if self._restored_step is None else self._restored_step + 1
                self._tensorboard = SummaryWriter(
                    str(self.path / TENSORBOARD_DIR),
                    purge_step=purge if self.resume else None,
                    flush_secs=TENSORBOARD_FLUSH_SECS,
                )
        return self._metrics, self._tensorboard

    def close(self) -> None:
        """Flush and close the metrics file and TensorBoard writer (safe to call twice)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
