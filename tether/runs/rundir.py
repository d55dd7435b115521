"""The run directory: resolved config, metrics log, TensorBoard events and checkpoints.

Layout of ``<run>/``::

    config.yaml      the resolved config (what ``load_config`` reads back to an equal object)
    metrics.jsonl    one JSON object per ``log`` call: {"step": 12, "time": 1.7e9, "kl/mean": ...}
    tb/              the same scalars as TensorBoard events (``report_to`` has tensorboard)
    wandb/ mlruns/ trackio/ trackers.json
                     the other ``report_to`` trackers (see ``tether.runs.trackers``)
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
import shutil
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch import nn

from tether.errors import (
    CheckpointError,
    ResumeMismatchError,
    RunDirError,
    RunExistsError,
    TetherWarning,
    describe_os_error,
)
from tether.runs.checkpoint import (
    StateDict,
    apply_checkpoint,
    check_finite_weights,
    latest_checkpoint,
    link_identical_weights,
    list_checkpoints,
    read_checkpoint,
    save_checkpoint,
)
from tether.runs.config import RunConfig, config_to_dict, normalize_report_to, save_config
from tether.runs.trackers import (
    DEFAULT_REPORT_TO,
    TENSORBOARD_DIR,
    TRACKER_OUTPUTS,
    Trackers,
    check_tracker_packages,
)

try:  # POSIX advisory locks; elsewhere run directories are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from accelerate import Accelerator

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESERVED_METRIC_KEYS = ("step", "time")
"""Keys every metrics line carries; a metric may not use them."""
FINAL_DIR = "final"
"""The trained model, written atomically at the end of a run (see :meth:`RunDir.write_final`)."""
LOCK_FILE = ".lock"
"""Held (``flock``) by the run writing the directory; names its process for the message."""
MODEL_OUTPUTS = (FINAL_DIR, "reward_model")
"""The trained-model directories a finished run leaves (LM trainers, the reward trainer)."""
RUN_OUTPUTS = (
    METRICS_FILE,
    TENSORBOARD_DIR,
    *TRACKER_OUTPUTS,
    "checkpoints",
    *MODEL_OUTPUTS,
    "best",
    "samples",
)
"""What a run writes into its directory: ``overwrite=true`` deletes these (and config.yaml)."""
RUN_MECHANICS_FIELDS = frozenset(
    {
        "output_dir",
        "resume",
        "resume_override",
        "overwrite",
        "logging_steps",
        "save_steps",
        "keep_last",
        "save_optimizer",
        "max_bad_steps",
        "report_to",
        "tracker_project",
        "run_name",
        "eval_episodes",  # (control: the evaluation after training)
    }
)
"""Config fields that may change on resume without changing the training (where and how often
things are written); any other difference needs ``resume_override=true``."""


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


# ------------------------------------------------------------------------------------------------
# The run-directory lock
# ------------------------------------------------------------------------------------------------

_LOCKS: dict[Path, list[int]] = {}
"""Resolved run directory → [lock file descriptor, holders in this process]."""


def _acquire_lock(path: Path) -> None:
    """Lock ``path`` for this process (re-entrant within it); another process holding it is a
    :class:`RunDirError` naming that process. The OS drops the lock when the process dies, so
    a killed run leaves nothing stale."""
    if fcntl is None:
        return
    key = path.resolve()
    if key in _LOCKS:
        _LOCKS[key][1] += 1
        return
    lock = path / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunDirError(describe_os_error(exc, "cannot create the run lock")) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise RunDirError(
            f"{path} is being written by another run ({holder}); wait for it to finish, or "
            "choose another output_dir"
        ) from None
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
    _LOCKS[key] = [fd, 1]


def _release_lock(path: Path) -> None:
    key = path.resolve()
    entry = _LOCKS.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        del _LOCKS[key]
        try:
            os.ftruncate(entry[0], 0)
        finally:
            os.close(entry[0])  # closing the descriptor releases the flock


# ------------------------------------------------------------------------------------------------
# Resume checks
# ------------------------------------------------------------------------------------------------


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_differences(
    saved: dict[str, Any], config: Any, saved_processes: int = 1, processes: int = 1
) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every field that changes the training: all fields
    but :data:`RUN_MECHANICS_FIELDS`, and the run's length (``max_steps``, ``total_timesteps``)
    only when the LR schedule depends on it (not under a constant ``lr_scheduler`` /
    ``lr_schedule``). ``batch_size`` is per process: it differs when the
    global batch (× the number of processes) does, so a run may resume on another number of
    processes with the same global batch. Keys missing from the saved config (written by an
    older tether) are not compared."""
    new = _flatten(config_to_dict(config))
    old = _flatten(saved)
    schedule = next((k for k in ("lr_scheduler", "lr_schedule") if k in new), None)
    constant = schedule is None or (new[schedule] == "constant" == old.get(schedule))
    diffs = []
    for key, value in new.items():
        top = key.split(".")[0]
        if top in RUN_MECHANICS_FIELDS or key not in old:
            continue
        if top in ("max_steps", "total_timesteps") and constant:
            continue
        if key == "batch_size" and isinstance(old[key], int) and isinstance(value, int):
            if old[key] * saved_processes == value * processes:
                continue
        if old[key] != value:
            diffs.append((key, old[key], value))
    return diffs


def _format_differences(diffs: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {key}: {old!r} (saved) → {new!r} (now)" for key, old, new in diffs)


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
        save_optimizer: which checkpoints hold the optimizer state: ``"last"`` (the newest only;
            a checkpoint at a step that is not a multiple of ``save_steps``, i.e. the end of a
            run, holds none), ``"all"`` or ``"none"``.
        save_steps: the run's checkpoint interval (0: at the end only), for ``save_optimizer``.
        report_to: the experiment trackers metrics also go to (see :mod:`tether.runs.trackers`);
            an unknown name is a ``ValueError``, a tracker whose package is missing a
            :class:`tether.runs.ConfigError`, both raised here, before anything is written.
        tracker_project: the trackers' project (W&B, trackio) / experiment (MLflow).
        run_name: the run's name in the trackers (default: the directory's name).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        accelerator: Accelerator | None = None,
        *,
        config: Any = None,
        resume: bool = False,
        keep_last: int | None = 2,
        overwrite: bool = False,
        resume_override: bool = False,
        save_optimizer: str = "last",
        save_steps: int = 0,
        report_to: str | Sequence[str] | None = DEFAULT_REPORT_TO,
        tracker_project: str = "tether",
        run_name: str | None = None,
    ) -> None:
        trackers = normalize_report_to(report_to)
        check_tracker_packages(trackers)
        self.path = Path(path)
        self.accelerator = accelerator
        self.resume = resume
        self.keep_last = keep_last
        self.save_optimizer = save_optimizer
        self.save_steps = save_steps
        self.is_main_process = accelerator is None or accelerator.is_main_process
        self.overridden: list[tuple[str, Any, Any]] = []
        """The differences from the saved config a ``resume_override`` resume applies."""
        self._restored_step: int | None = None
        self._metrics: IO[str] | None = None
        self._config = config
        self._trackers = Trackers(
            trackers,
            self.path,
            project=tracker_project,
            run_name=run_name or self.path.resolve().name,
            accelerator=accelerator,
        )
        self._locked = False
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"output_dir {str(self.path)!r} is a file, expected a directory")
        if self.is_main_process:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RunDirError(
                    describe_os_error(exc, f"cannot create output_dir {str(self.path)!r}")
                ) from exc
            _acquire_lock(self.path)
            self._locked = True
        try:
            self._check_existing(config, overwrite, resume_override)
            if self.is_main_process:
                if overwrite:
                    self._delete_outputs()
                if config is not None:
                    save_config(config, self.path / CONFIG_FILE)
        except BaseException:
            self.close()
            raise
        if accelerator is not None:
            accelerator.wait_for_everyone()

    def _holds_run(self) -> bool:
        return any((self.path / name).exists() for name in (METRICS_FILE, *MODEL_OUTPUTS)) or bool(
            list_checkpoints(self.path)
        )

    def _check_existing(self, config: Any, overwrite: bool, resume_override: bool) -> None:
        """Refuse to mix a new run into an old one, and a resume that would misrepresent it."""
        if not self.resume:
            if self._holds_run() and not overwrite:
                raise RunExistsError(
                    f"{self.path} already holds a run (metrics.jsonl, checkpoints/ or a trained "
                    "model): "
                    "set resume=true to continue it, overwrite=true to delete it and start "
                    "over, or choose another output_dir"
                )
            return
        if not list_checkpoints(self.path):
            warnings.warn(
                f"resume=true, but {self.path} has no checkpoint yet: starting from step 0"
                + (
                    " (its metrics.jsonl is restarted)"
                    if (self.path / METRICS_FILE).exists()
                    else ""
                ),
                TetherWarning,
                stacklevel=3,
            )
            return
        saved_file = self.path / CONFIG_FILE
        if config is None or not saved_file.is_file():
            return
        try:
            saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise RunDirError(
                f"cannot read the saved config {saved_file} of the run to resume: {exc}"
            ) from None
        if not isinstance(saved, dict):
            raise RunDirError(f"{saved_file}: expected a mapping of config keys")
        processes = 1 if self.accelerator is None else self.accelerator.num_processes
        diffs = config_differences(saved, config, _saved_processes(self.path), processes)
        if not diffs:
            return
        if not resume_override:
            raise ResumeMismatchError(
                f"cannot resume {self.path}: the config differs from the one it was trained "
                f"with in fields that change the training:\n{_format_differences(diffs)}\n"
                "Resume with the saved values (drop these overrides), set resume_override=true "
                "to continue with the new ones, or start a new run in another output_dir."
            )
        self.overridden = diffs
        warnings.warn(
            f"resume_override: continuing {self.path} with new values:\n"
            + _format_differences(diffs),
            TetherWarning,
            stacklevel=3,
        )

    def _delete_outputs(self) -> None:
        for name in (*RUN_OUTPUTS, CONFIG_FILE):
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()

    @classmethod
    def from_config(cls, config: RunConfig, accelerator: Accelerator | None = None) -> RunDir:
        """The run directory ``config.output_dir``, resuming if ``config.resume``."""
        return cls(
            config.output_dir,
            accelerator,
            config=config,
            resume=config.resume,
            keep_last=config.keep_last,
            overwrite=getattr(config, "overwrite", False),
            resume_override=getattr(config, "resume_override", False),
            save_optimizer=getattr(config, "save_optimizer", "last"),
            save_steps=getattr(config, "save_steps", 0),
            report_to=getattr(config, "report_to", DEFAULT_REPORT_TO),
            tracker_project=getattr(config, "tracker_project", "tether"),
            run_name=getattr(config, "run_name", None),
        )

    # -- checkpoints -----------------------------------------------------------------------------

    def restore(
        self,
        *,
        models: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
    ) -> tuple[int, dict[str, Any]]:
        """Load the latest intact checkpoint when resuming; return ``(step, states)``.

        Returns ``(0, {})`` for a fresh run (not resuming, or resuming a run with no checkpoint
        yet). A checkpoint that cannot be read (truncated, corrupt) is set aside as
        ``checkpoints/.unreadable-step-*`` with a warning and the previous one is tried. When
        resuming, metric lines (and TensorBoard events) after the restored step are dropped, so
        the continued run logs no step twice. Under ``resume_override`` the new config's
        optimizer settings and LR schedule replace the saved ones from the restored step on.
        Call it before the first :meth:`log`.
        """
        if self._metrics is not None:
            raise RuntimeError("RunDir.restore() must be called before the first log()")
        step, states, found = 0, {}, False
        if self.resume:
            fresh_groups = (
                [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
                if optimizer is not None
                else []
            )
            new_base_lrs = list(getattr(_inner_scheduler(scheduler), "base_lrs", []))
            for ckpt in reversed(list_checkpoints(self.path)):
                try:
                    data = read_checkpoint(ckpt, accelerator=self.accelerator)
                except CheckpointError as exc:
                    warnings.warn(
                        f"{exc}; falling back to the previous checkpoint",
                        TetherWarning,
                        stacklevel=2,
                    )
                    if self.accelerator is not None:
                        self.accelerator.wait_for_everyone()
                    if self.is_main_process:
                        os.replace(ckpt, ckpt.with_name(f".unreadable-{ckpt.name}"))
                    continue
                step, states = apply_checkpoint(
                    data,
                    models=models,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    accelerator=self.accelerator,
                    missing_optimizer="warn",
                )
                found = True
                break
            if found and self.overridden:
                _apply_new_optimizer_settings(optimizer, scheduler, fresh_groups, new_base_lrs)
            if not found and self._any_unreadable():
                raise CheckpointError(
                    f"no readable checkpoint in {self.path / 'checkpoints'} (the unreadable "
                    "ones were moved to .unreadable-step-*): start over with overwrite=true"
                )
        self._restored_step = step if found else -1
        if self.resume and self.is_main_process:
            _truncate_metrics(self.path / METRICS_FILE, self._restored_step)
        return step, states

    def _any_unreadable(self) -> bool:
        root = self.path / "checkpoints"
        return root.is_dir() and any(p.name.startswith(".unreadable-") for p in root.iterdir())

    def save(
        self,
        step: int,
        *,
        models: Mapping[str, nn.Module | StateDict],
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        states: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save a checkpoint for ``step`` (see :func:`tether.runs.checkpoint.save_checkpoint`).

        The optimizer state goes in as ``save_optimizer`` says (:meth:`keeps_optimizer`); under
        ``"last"`` the older checkpoints drop theirs once this one is installed. Non-finite
        weights are never written: they raise :class:`tether.errors.NumericalError` naming the
        model, the step and the last good checkpoint, which stays on disk."""
        return save_checkpoint(
            self.path,
            step,
            models=models,
            optimizer=optimizer if self.keeps_optimizer(step) else None,
            scheduler=scheduler,
            states=states,
            accelerator=self.accelerator,
            keep_last=self.keep_last,
            drop_older_optimizers=self.save_optimizer == "last",
        )

    def keeps_optimizer(self, step: int) -> bool:
        """Whether the checkpoint of ``step`` holds the optimizer state: always under
        ``save_optimizer="all"``, never under ``"none"``; under ``"last"`` at the steps
        ``save_steps`` hits (every step when it is 0), not at an end-of-run step between them.

        Why the end-of-run exception: AdamW's state is twice the weights, and a finished run's
        last checkpoint is there to extend the run (``resume=true max_steps=...``), which then
        continues from its weights, schedule, RNG and data position with fresh optimizer
        moments (and a warning). A run that must extend bit-identically sets ``save_steps`` to
        a divisor of ``max_steps`` (or 0) or ``save_optimizer=all``."""
        if self.save_optimizer == "none":
            return False
        if self.save_optimizer == "all":
            return True
        return not self.save_steps or step % self.save_steps == 0

    def write_final(
        self, save: Any, models: Mapping[str, nn.Module] | None = None, name: str = FINAL_DIR
    ) -> Path:
        """Write ``final/`` (or ``name``) atomically: ``save(dir)`` fills a temporary directory
        that then replaces it in one rename, so a crash never leaves a half-written model. With
        ``models``, their weights are checked finite first (a non-finite model is never
        written). Every process must call it; the main process writes."""
        final = self.path / name
        if models:
            from tether.models.sharding import is_sharded
            from tether.runs.checkpoint import check_finite_shards

            for model_name, model in models.items():
                if is_sharded(model):  # every process checks its shards, one verdict
                    check_finite_shards({model_name: model}, f"{name}/", self.path)
                else:
                    check_finite_weights(model.state_dict(), model_name, f"{name}/", self.path)
        # a sharded model is gathered on every process before the main process writes it
        from tether.models.sharding import collect_for_save

        collect_for_save(save)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        if self.is_main_process:
            tmp = self.path / f".tmp-{name}-{os.getpid()}"
            old = self.path / f".old-{name}-{os.getpid()}"
            for leftover in (tmp, old):
                if leftover.exists():
                    shutil.rmtree(leftover)
            try:
                save(tmp)
                # One copy of the weights on disk: final/'s file becomes a hard link to the
                # end-of-run checkpoint's where the tensors are the same (not for LoRA adapters).
                link_identical_weights(tmp, latest_checkpoint(self.path))
                if final.exists():
                    os.replace(final, old)
                os.replace(tmp, final)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if old.exists() and not final.exists():
                    os.replace(old, final)
                raise RunDirError(describe_os_error(exc, f"cannot write {final}")) from exc
            shutil.rmtree(old, ignore_errors=True)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        return final

    # -- metrics ---------------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step", "time", **metrics}`` to metrics.jsonl (flushed) and log the metrics
        to the ``report_to`` trackers (TensorBoard by default).

        Values may be numbers, 1-element tensors or numpy scalars; NaN/inf are written as
        ``null`` to the JSON (and as they are to the trackers).
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
        metrics_file = self._writers()
        metrics_file.write(json.dumps(record, allow_nan=False) + "\n")
        metrics_file.flush()
        self._trackers.log(values, step, now)

    def _writers(self) -> IO[str]:
        """Open metrics.jsonl and start the trackers on the first log (after restore()): a
        resumed run continues the trackers' runs and TensorBoard hides the events after the
        restored step."""
        if self._metrics is None:
            self._metrics = (self.path / METRICS_FILE).open("a", encoding="utf-8")
            purge = None if self._restored_step is None else self._restored_step + 1
            restored = self._restored_step is not None and self._restored_step >= 0
            config = self._config
            if config is not None and not isinstance(config, Mapping):
                config = config_to_dict(config)
            self._trackers.start(
                config,
                resume=self.resume and restored,
                purge_step=purge if self.resume else None,
            )
        return self._metrics

    def close(self) -> None:
        """Flush and close the metrics file and finish the trackers, and release the
        directory's lock (safe to call twice)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        self._trackers.finish()
        if self._locked:
            self._locked = False
            _release_lock(self.path)

    def __enter__(self) -> RunDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _apply_new_optimizer_settings(
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    fresh_groups: list[dict[str, Any]],
    new_base_lrs: list[float],
) -> None:
    """After a ``resume_override`` restore: the new config's optimizer hyper-parameters (the
    restored state would keep the saved ones) and its LR schedule, evaluated at the restored
    step (a ``LambdaLR``'s lambdas already are the new config's; its base LRs are not)."""
    if optimizer is None:
        return
    for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
        group.update(fresh)
    scheduler = _inner_scheduler(scheduler)
    if scheduler is None or not hasattr(scheduler, "lr_lambdas") or not new_base_lrs:
        return
    scheduler.base_lrs = list(new_base_lrs)
    for group, base, lam in zip(
        optimizer.param_groups, new_base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["initial_lr"] = base
        group["lr"] = base * lam(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _inner_scheduler(scheduler: Any) -> Any:
    """The torch scheduler inside accelerate's ``AcceleratedScheduler`` wrapper (or itself)."""
    return getattr(scheduler, "scheduler", scheduler)


def _saved_processes(path: Path) -> int:
    """How many processes wrote the run's latest checkpoint (1 when unknown)."""
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        return 1
    try:
        manifest = json.loads((checkpoints[-1] / "checkpoint.json").read_text(encoding="utf-8"))
        return int(manifest.get("num_processes", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1
