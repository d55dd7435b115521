"""Experiment trackers (TensorBoard, W&B, MLflow, trackio) through accelerate's integrations.

``report_to`` (a :class:`tether.runs.RunConfig` option, like TRL's) names the trackers that get
every metric besides ``metrics.jsonl``, which stays the source of truth. The trackers are
accelerate's own classes (``accelerate.tracking``), started by the run directory on its first
``log`` (after ``restore``, so a resumed run knows its step), on the main process only, and set
to write inside the run directory unless the user's environment points them elsewhere:

    tensorboard  <run>/tb/                      events (the config as hparams in tb/<time>/)
    wandb        <run>/wandb/offline-run-*/     offline unless WANDB_MODE is set
    mlflow       <run>/mlruns/                  file store unless MLFLOW_TRACKING_URI is set
    trackio      <run>/trackio/<project>.db     unless TRACKIO_DIR is set

The run's resolved config is logged once per start, flattened to dotted keys. The ids a resumed
run continues under (the W&B run id, the MLflow run id) are kept in ``<run>/trackers.json``.

Why not ``Accelerator(log_with=...)`` + ``init_trackers``: the control trainers have no
Accelerator, ``Accelerator.end_training`` also destroys the process group (a run in a sweep or a
test session would take the next run's with it), and the trackers' settings depend on the run
directory and the restored step, which are known only after the Accelerator exists. The same
tracker objects are appended to ``accelerator.trackers`` while the run is open, so
``accelerator.log`` and ``accelerator.get_tracker("wandb", unwrap=True)`` reach them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.errors import TetherError, TetherWarning
from tether.runs.config import TRACKERS, ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

DEFAULT_REPORT_TO = ("tensorboard",)
TENSORBOARD_DIR = "tb"
WANDB_DIR = "wandb"
MLFLOW_DIR = "mlruns"
TRACKIO_DIR = "trackio"
STATE_FILE = "trackers.json"
"""The ids a resumed run continues its trackers under."""
TRACKER_OUTPUTS = (WANDB_DIR, MLFLOW_DIR, TRACKIO_DIR, STATE_FILE)
"""What the trackers (other than TensorBoard) write into the run directory."""
TENSORBOARD_FLUSH_SECS = 30
_MLFLOW_BAD_KEY_CHARS = re.compile(r"[^\w./\- :]")
"""Characters MLflow refuses in a metric name (it allows word characters, ``. / - : space``)."""


class TrackerError(TetherError, RuntimeError):
    """A tracker named in ``report_to`` could not start (the message names it and the cause)."""


def check_tracker_packages(names: Iterable[str]) -> None:
    """Raise :class:`tether.runs.ConfigError` naming the pip package of a tracker that is not
    installed. TensorBoard is a dependency of tether; without it, metrics go to metrics.jsonl
    only, with a warning (see :class:`Trackers`)."""
    for name in names:
        package = TRACKERS[name]
        if name != "tensorboard" and importlib.util.find_spec(package) is None:
            alternative = " (or mlflow-skinny)" if name == "mlflow" else ""
            raise ConfigError(
                f"report_to: {name!r} needs the {package!r} package, which is not installed: "
                f"pip install {package}{alternative}, or pip install 'tether[trackers]' for "
                "all trackers, or drop it from report_to"
            )


def flat_config(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """A nested config dict as one level of dotted keys whose values every tracker accepts
    (TensorBoard's hparams take only bool/int/float/str): ``None`` → ``"null"``, a list →
    its JSON text, an empty mapping → ``"{}"``."""
    out: dict[str, bool | int | float | str] = {}

    def walk(data: Mapping[str, Any], prefix: str) -> None:
        for key, value in data.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                walk(value, f"{name}.")
            elif isinstance(value, Mapping):
                out[name] = "{}"
            elif value is None:
                out[name] = "null"
            elif isinstance(value, (bool, int, float, str)):
                out[name] = value
            else:
                out[name] = json.dumps(value, default=str)

    walk(config, "")
    return out


def read_state(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``<run>/trackers.json`` (empty when missing or unreadable)."""
    try:
        data = json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(run_dir: Path, state: Mapping[str, Any]) -> None:
    path = run_dir / STATE_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _point_trackio_at(directory: Path) -> None:
    """trackio reads ``TRACKIO_DIR`` once, at import, into module constants: set them (in every
    loaded trackio module) so that this run's database lands in ``directory``."""
    for name, module in list(sys.modules.items()):
        if name == "trackio" or name.startswith("trackio."):
            if hasattr(module, "TRACKIO_DIR"):
                module.TRACKIO_DIR = directory
            if hasattr(module, "MEDIA_DIR"):
                module.MEDIA_DIR = directory / "media"
            if hasattr(module, "ARTIFACTS_DIR"):
                module.ARTIFACTS_DIR = directory / "artifacts"


def _log_config(name: str, tracker: Any, flat: dict[str, Any]) -> None:
    """``tracker.store_init_configuration(flat)``; for MLflow only the entries the run does not
    hold yet: MLflow refuses to change a logged param, and a resumed run's config differs at
    least in ``resume`` (config.yaml holds the values it continued with)."""
    if name == "mlflow":
        import mlflow

        logged = mlflow.get_run(tracker.active_run.info.run_id).data.params
        flat = {key: value for key, value in flat.items() if key not in logged}
    tracker.store_init_configuration(flat)


def _mlflow_metrics(values: Mapping[str, int | float]) -> dict[str, int | float]:
    return {_MLFLOW_BAD_KEY_CHARS.sub("_", key): value for key, value in values.items()}


class Trackers:
    """The ``report_to`` trackers of one run directory (main process only).

    Args:
        names: tracker names (see :func:`normalize_report_to`).
        run_dir: the run directory the trackers write into.
        project: the W&B / trackio project and the MLflow experiment.
        run_name: the run's name in the trackers.
        accelerator: the run's accelerator, whose ``trackers`` list holds them while open.
    """

    def __init__(
        self,
        names: Sequence[str],
        run_dir: Path,
        *,
        project: str,
        run_name: str,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.names = list(names)
        self.run_dir = run_dir
        self.project = project
        self.run_name = run_name
        self.accelerator = accelerator
        self.active: dict[str, Any] = {}
        """Started trackers: name → accelerate ``GeneralTracker``."""

    def start(
        self, config: Mapping[str, Any] | None, *, resume: bool, purge_step: int | None
    ) -> None:
        """Start every tracker and log ``config`` (flattened) to each, once.

        Args:
            config: the run's resolved config as a nested dict, or None.
            resume: continue the trackers' runs recorded in trackers.json (a resumed run that
                restored a checkpoint); otherwise new runs are started.
            purge_step: TensorBoard hides events at and after this step (a resumed run's
                first step), or None.

        Raises:
            TrackerError: a tracker failed to start (the ones already started are finished).
        """
        if not self.names:
            return
        from accelerate import PartialState

        PartialState()  # accelerate's trackers log through its logger, which needs the state
        state = read_state(self.run_dir) if resume else {}
        flat = flat_config(config) if config is not None else None
        for name in self.names:
            try:
                tracker = self._start_one(name, state, flat, purge_step)
            except Exception as exc:
                self.finish()
                raise TrackerError(
                    f"report_to: {name} could not start ({type(exc).__name__}: {exc}); "
                    f"{_START_HINTS[name]}"
                ) from exc
            if tracker is None:
                continue
            self.active[name] = tracker
            if flat is not None and name != "trackio":  # trackio got it in init(config=...)
                self._guard(name, "log the config", _log_config, name, tracker, flat, drop=False)
        if self.accelerator is not None:
            self.accelerator.trackers.extend(self.active.values())
        if state:
            _write_state(self.run_dir, {**read_state(self.run_dir), **state})

    def _start_one(
        self,
        name: str,
        state: dict[str, dict[str, Any]],
        config: dict[str, Any] | None,
        purge_step: int | None,
    ) -> Any:
        """Create and start one accelerate tracker (None: skipped); record its ids in state."""
        from accelerate import tracking

        if name == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:  # the `tensorboard` package is missing
                warnings.warn(
                    "tensorboard is not installed: metrics go to metrics.jsonl only "
                    "(pip install tensorboard)",
                    stacklevel=5,
                )
                return None
            tracker = tracking.TensorBoardTracker(
                TENSORBOARD_DIR,
                str(self.run_dir),
                purge_step=purge_step,
                flush_secs=TENSORBOARD_FLUSH_SECS,
            )
        elif name == "wandb":
            run_id = state.get("wandb", {}).get("id") or secrets.token_hex(4)  # W&B: [a-z0-9]
            kwargs: dict[str, Any] = {
                "dir": str(self.run_dir),
                "name": self.run_name,
                "id": run_id,
                "resume": "allow",
            }
            if not os.environ.get("WANDB_MODE"):
                kwargs["mode"] = "offline"
            tracker = tracking.WandBTracker(self.project, **kwargs)
            state["wandb"] = {"id": run_id}
        elif name == "mlflow":
            import mlflow

            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                uri = (self.run_dir / MLFLOW_DIR).resolve().as_uri()
                # MLflow ≥ 3.7 keeps its file store only behind this opt-in
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri)
            previous = state.get("mlflow", {})
            run_id = previous.get("run_id") if previous.get("tracking_uri") == uri else None
            tracker = tracking.MLflowTracker(
                experiment_name=self.project, run_id=run_id, run_name=self.run_name
            )
        elif name == "trackio":
            if not os.environ.get("TRACKIO_DIR"):
                import trackio  # noqa: F401  (reads TRACKIO_DIR at import)

                _point_trackio_at((self.run_dir / TRACKIO_DIR).resolve())
            previous = state.get("trackio", {})
            tracker = tracking.TrackioTracker(
                self.project,
                name=self.run_name,
                resume="allow" if previous else "never",
                config=config,
            )
        else:  # pragma: no cover - normalize_report_to rejects it
            raise ValueError(f"unknown tracker {name!r}")
        tracker.main_process_only = False  # the run directory already logs on the main only
        tracker.start()
        if name == "mlflow":
            state["mlflow"] = {"run_id": tracker.active_run.info.run_id, "tracking_uri": uri}
        elif name == "trackio":
            state["trackio"] = {"project": self.project, "name": tracker.run.name}
        return tracker

    def log(self, values: Mapping[str, int | float], step: int, walltime: float) -> None:
        """Log numeric ``values`` at ``step`` to every tracker. A tracker that fails is
        switched off for the rest of the run with a warning (metrics.jsonl has every value)."""
        for name, tracker in list(self.active.items()):
            if name == "tensorboard":
                self._guard(name, f"log step {step}", tracker.log, values, step, walltime=walltime)
            elif name == "mlflow":
                self._guard(name, f"log step {step}", tracker.log, _mlflow_metrics(values), step)
            else:
                self._guard(name, f"log step {step}", tracker.log, dict(values), step)

    def _guard(
        self, name: str, action: str, fn: Any, *args: Any, drop: bool = True, **kwargs: Any
    ) -> None:
        """Call ``fn``; if it fails, warn and (with ``drop``) switch the tracker off."""
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            off = " it is switched off for the rest of this run;" if drop else ""
            warnings.warn(
                f"report_to: {name} failed to {action} ({type(exc).__name__}: {exc});{off} "
                "metrics.jsonl and config.yaml hold everything",
                TetherWarning,
                stacklevel=4,
            )
            if drop:
                self._drop(name)

    def _drop(self, name: str) -> None:
        tracker = self.active.pop(name, None)
        if tracker is None:
            return
        if self.accelerator is not None and tracker in self.accelerator.trackers:
            self.accelerator.trackers.remove(tracker)
        try:
            tracker.finish()
        except Exception as exc:
            warnings.warn(
                f"report_to: {name} failed to finish ({type(exc).__name__}: {exc})",
                TetherWarning,
                stacklevel=4,
            )

    def finish(self) -> None:
        """Finish (flush and close) every tracker; safe to call twice."""
        for name in list(self.active):
            self._drop(name)


_START_HINTS = {
    "tensorboard": "check that the run directory is writable",
    "wandb": "W&B runs offline unless WANDB_MODE is set; with WANDB_MODE=online, run "
    "`wandb login` first",
    "mlflow": "check MLFLOW_TRACKING_URI (default: a file store in <run>/mlruns)",
    "trackio": "check TRACKIO_DIR / TRACKIO_SPACE_ID (default: <run>/trackio)",
}
