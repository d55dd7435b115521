"""Numerical guards every LM trainer runs by default: a non-finite step is skipped, not taken.

* :class:`StepGuard` counts skipped steps (a non-finite loss, gradient norm, reward or KL), names
  the cause in a warning, and stops the run with a :class:`tether.errors.NumericalError` after
  ``max_bad_steps`` in a row. Checkpoints refuse non-finite weights
  (:func:`tether.runs.checkpoint.check_finite_weights`), so the last good model is never pruned.
* :func:`guarded_optimizer_step`: clip, check the global gradient norm, step (or skip) — the same
  decision on every process.
* :class:`UpdateSnapshot`: what an RL update changes (trainable parameters, optimizer and
  scheduler state), so an update whose KL to the reference passes ``kl_max`` is rolled back.
* :class:`KLWatch`: a warning when the measured KL stays far above the controller's target
  while β does not move.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tether.errors import NumericalError, TetherWarning

Note = Callable[[str], None]


def _warn(message: str) -> None:
    warnings.warn(message, TetherWarning, stacklevel=3)


class StepGuard:
    """Skips non-finite steps and stops the run after ``max_bad_steps`` of them in a row.

    The trainer sets :attr:`step` (the step being computed) before the work of each step and
    calls :meth:`skip` with the cause, or :meth:`good` after a step that was taken. Its state
    (total and consecutive counts) is saved in checkpoints, so a resumed run counts on.

    Args:
        max_bad_steps: consecutive skipped steps that stop the run (≥ 1).
        run_dir: the run directory, for the last good checkpoint in the message.
        note: where a skipped step is reported (a progress bar's ``note``; default: a
            :class:`tether.errors.TetherWarning`).
    """

    def __init__(
        self,
        max_bad_steps: int,
        run_dir: str | os.PathLike[str] | None = None,
        note: Note | None = None,
    ) -> None:
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be ≥ 1, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.run_dir = run_dir
        self.note = note
        self.step = 0
        self.total = 0
        self.consecutive = 0
        self.last_cause: str | None = None

    def skip(self, cause: str) -> None:
        """Count a skipped step; raise :class:`NumericalError` at ``max_bad_steps`` in a row."""
        self.total += 1
        self.consecutive += 1
        self.last_cause = cause
        message = (
            f"step {self.step}: {cause}; the update was skipped ({self.consecutive} in a row, "
            f"{self.total} in all; the run stops at max_bad_steps={self.max_bad_steps})"
        )
        (self.note or _warn)(message)
        if self.consecutive >= self.max_bad_steps:
            from tether.runs.checkpoint import latest_checkpoint

            last = latest_checkpoint(self.run_dir) if self.run_dir is not None else None
            keep = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise NumericalError(
                f"stopped at step {self.step}: {self.consecutive} steps in a row were skipped, "
                f"the last for {cause} (max_bad_steps={self.max_bad_steps}); {keep}. Lower "
                "learning_rate, keep max_grad_norm on, check the reward and the data, then "
                "resume from the checkpoint (resume=true)"
            )

    def good(self) -> None:
        """A step was taken: the run of bad steps ends."""
        self.consecutive = 0

    def metrics(self) -> dict[str, float]:
        """``bad_steps``: skipped steps so far (logged with every line)."""
        return {"bad_steps": float(self.total)}

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = int(state["total"])
        self.consecutive = int(state["consecutive"])


def all_finite(accelerator: Any, *values: float | torch.Tensor | None) -> bool:
    """Whether every value is finite on every process (one all-reduce when there are several)."""
    bad = 0.0
    for v in values:
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            bad += float(v.numel() > 0 and not bool(torch.isfinite(v.detach()).all()))
        else:
            bad += float(not math.isfinite(float(v)))
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        flag = torch.tensor([bad], device=accelerator.device)
        bad = float(accelerator.reduce(flag, reduction="sum").item())
    return bad == 0


def guarded_optimizer_step(
    accelerator: Any,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_grad_norm: float | None,
    guard: StepGuard | None = None,
    loss: float | torch.Tensor | None = None,
) -> float | None:
    """Clip the gradient norm (if configured), then step optimizer and schedule — unless the
    loss (this process's) or the global gradient norm is not finite: then, with a ``guard``, the
    gradients are dropped, nothing steps, and the guard counts the skip. Gradients are cleared
    either way.

    Returns the gradient norm before clipping (``None`` when clipping is off and the step was
    taken); NaN/inf for a skipped step.
    """
    clip = max_grad_norm if max_grad_norm is not None else math.inf
    norm = float(accelerator.clip_grad_norm_(module.parameters(), clip))
    if guard is not None:
        loss_ok = all_finite(accelerator, loss)
        if not loss_ok or not math.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            guard.skip(
                "a non-finite loss" if not loss_ok else f"a non-finite gradient norm ({norm})"
            )
            return norm
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if guard is not None:
        guard.good()
    return norm if max_grad_norm is not None else None


class UpdateSnapshot:
    """The trainable parameters and the optimizer and scheduler states before an update, to
    roll it back (``kl_max``). Costs one copy of the trainable parameters and of the optimizer
    state (on the parameters' device)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.values = [p.detach().clone() for p in self.params]
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())
        self.scheduler_state = copy.deepcopy(scheduler.state_dict())
        self.optimizer, self.scheduler = optimizer, scheduler

    @torch.no_grad()
    def restore(self) -> None:
        for p, v in zip(self.params, self.values, strict=True):
            p.copy_(v)
        self.optimizer.load_state_dict(self.optimizer_state)
        self.scheduler.load_state_dict(self.scheduler_state)


class KLWatch:
    """Warns once when the measured KL has exceeded ``factor`` × the target for ``iterations``
    updates in a row while a β > 0 moved by less than 1 % over them (a controller that is not
    controlling: a fixed β, a horizon too long, a clipped error). ``factor`` 0 turns it off."""

    REL_MOVE = 0.01
    """β moving less than this (relative) over the window counts as not moving."""

    def __init__(
        self, target: float | None, factor: float, iterations: int, note: Note | None
    ) -> None:
        self.target, self.factor, self.iterations = target, factor, iterations
        self.note = note
        self.history: list[tuple[float, float]] = []
        self.warned = False

    def observe(self, step: int, kl: float, beta: float) -> str | None:
        """Record one update's KL and β; returns (and reports) the warning when it fires."""
        off = self.target is None or self.target <= 0 or self.factor <= 0
        if off or self.warned or not math.isfinite(kl):
            return None
        self.history = [*self.history, (kl, beta)][-self.iterations :]
        if len(self.history) < self.iterations:
            return None
        if any(k <= self.factor * self.target for k, _ in self.history):
            return None
        betas = [b for _, b in self.history]
        if betas[-1] <= 0:  # no penalty by choice (β = 0): nothing is meant to hold the KL
            return None
        move = (max(betas) - min(betas)) / max(abs(betas[0]), 1e-12)
        if move >= self.REL_MOVE:
            return None
        self.warned = True
        ratio = min(k for k, _ in self.history) / self.target
        message = (
            f"step {step}: the KL to the reference has been above {self.factor:g}× kl_target "
            f"({ratio:.1f}× at least, target {self.target:g}) for {self.iterations} updates "
            f"while β stayed at {betas[-1]:.4g}: the penalty is not holding the KL. Use "
            "kl_controller=adaptive or pid, a shorter kl_horizon, or a larger kl_coef"
        )
        (self.note or _warn)(message)
        return message

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history], "warned": self.warned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(float(k), float(b)) for k, b in state["history"]]
        self.warned = bool(state["warned"])
