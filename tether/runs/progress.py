"""Progress for training loops: step / total, speed, ETA and a few metrics, on the main process.

On a terminal, a live bar. Without one (``nohup``, Slurm, CI, ``make demo > log``), one plain line
per update that carries metrics (the loops pass them on logging steps), flushed at once, so a log
says what a long run is doing: ``train step 12/100  s/step 6.41  ETA 9m24s  loss 0.6931``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

if TYPE_CHECKING:
    from accelerate import Accelerator


def _format_metric(name: str, value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"{name} {value}"
    return f"{name} {number:.4g}" if math.isfinite(number) else f"{name} {number}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """``with Progress(total=cfg.max_steps, initial=step, metrics=["loss", "kl/mean"]) as bar:``
    then ``bar.update(step, metrics)`` after each step.

    Args:
        total: the last step.
        initial: the step the loop starts from (the restored step when resuming).
        metrics: the metric names to show, in order; others passed to :meth:`update` are ignored.
        description: text in front of the bar.
        accelerator: only its main process shows a bar.
        console: where to draw; the default is stdout, enabled only when it is a terminal.
        enabled: force the bar on or off (``None``: decide from the process and the terminal).
        plain: without a bar, print plain lines (``None``: on the main process when there is no
            terminal).
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        metrics: Sequence[str] = (),
        description: str = "train",
        accelerator: Accelerator | None = None,
        console: Console | None = None,
        enabled: bool | None = None,
        plain: bool | None = None,
    ) -> None:
        self.metrics = tuple(metrics)
        self._shown: dict[str, Any] = {}
        console = console or Console()
        main = accelerator is None or accelerator.is_main_process
        self.enabled = (main and console.is_terminal) if enabled is None else enabled
        self.plain = (main and not self.enabled) if plain is None else plain
        self.total, self.description = total, description
        self._start_step, self._start_time = initial, time.perf_counter()
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        if self.enabled:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("<"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=console,
            )
            self._task = self._bar.add_task(description, total=total, completed=initial, metrics="")
            self._bar.start()

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Move the bar to ``step`` and show the latest values of the chosen metrics (without a
        terminal: print one line when ``metrics`` are given)."""
        for name in self.metrics:
            if metrics and name in metrics:
                self._shown[name] = metrics[name]
        text = "  ".join(
            _format_metric(name, self._shown[name]) for name in self.metrics if name in self._shown
        )
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=step, metrics=text)
        elif self.plain and metrics:
            print(self._plain_line(step, text), flush=True)

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (a one-off stage, e.g. the step-0 evaluation) out of s/step and the
        ETA."""
        self._start_time += seconds

    def note(self, text: str) -> None:
        """A line above the bar (or a plain line without a terminal), on the main process: for
        stages that take a while, such as a held-out evaluation."""
        if self._bar is not None:
            self._bar.console.print(text)
        elif self.plain:
            print(text, flush=True)

    def _plain_line(self, step: int, text: str) -> str:
        done = step - self._start_step
        elapsed = time.perf_counter() - self._start_time
        parts = [f"{self.description} step {step}/{self.total}"]
        if done > 0:
            per = elapsed / done
            parts.append(f"s/step {per:.3g}")
            parts.append(f"ETA {_duration(per * max(self.total - step, 0))}")
        if text:
            parts.append(text)
        return "  ".join(parts)

    def close(self) -> None:
        """Stop drawing (safe to call twice)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
