"""``report_to``: metrics.jsonl's values reach TensorBoard, W&B (offline), MLflow (file store) and
trackio (local SQLite), all inside the run directory, read back with each tracker's own reader
(or its on-disk format) and compared with metrics.jsonl; the config is logged once; bad names
and missing packages are config errors before anything runs. No network: W&B is offline and
points at a closed local port, trackio/MLflow write files."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tether.runs import ConfigError, RunConfig, RunDir, load_config, option, read_metrics
from tether.runs import trackers as trackers_module
from tether.runs.config import normalize_report_to
from tether.runs.trackers import STATE_FILE, flat_config, read_state

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@dataclass
class LoopConfig(RunConfig):
    beta: float = option(0.1, help="KL coefficient.")
    hidden: list[int] = option([4, 8], help="Sizes.")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """No tracker may reach the network or the user's home: W&B offline by tether's default
    (WANDB_MODE unset) with its API pointed at a closed port, every cache under tmp_path."""
    for name in (
        "WANDB_MODE",
        "WANDB_API_KEY",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_RUN_ID",
        "MLFLOW_ALLOW_FILE_STORE",
        "TRACKIO_DIR",
        "TRACKIO_SPACE_ID",
        "TRACKIO_SERVER_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "wandb-data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ------------------------------------------------------------------------------------------------
# Readers: each tracker's data as {key: [(step, value), ...]}
# ------------------------------------------------------------------------------------------------


def jsonl_series(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl, the source of truth (null → NaN, as the trackers got the value)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run):
        for key, value in record.items():
            if key not in ("step", "time"):
                out.setdefault(key, []).append((record["step"], _num(value)))
    return out


def _num(value) -> float:
    return math.nan if value is None else float(value)


def tensorboard_series(run: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(run / "tb"))
    acc.Reload()
    return {
        tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
    }


def wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file (LevelDB log format: a 7-byte header ``:W&B`` + magic +
    version, then 32 KiB blocks of records ``crc32 (4) | length (2, LE) | type (1) | data``;
    type 1 = a whole record, 2/3/4 = its first/middle/last fragment)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, records, chunk = 32 * 1024, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(chunk)
            chunk = b""
    return records


def _finished_wandb_records(file: Path, pb, timeout_s: float = 60.0) -> list:
    """The parsed records of ``file`` once its ``exit`` record is there: ``run.finish()``
    returns before wandb's service process has written everything."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = []
        try:
            for data in wandb_records(file):
                record = pb.Record()
                record.ParseFromString(data)
                records.append(record)
        except Exception:  # a record still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{file} has no exit record after {timeout_s} s"
        time.sleep(0.2)


def wandb_run(run: Path) -> tuple[list[Path], dict[str, list[tuple[int, float]]], list[dict]]:
    """(offline run dirs, metric series, config updates) of the W&B runs in ``run/wandb``."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    dirs = sorted((run / "wandb").glob("offline-run-*"))
    series: dict[str, list[tuple[int, float]]] = {}
    configs: list[dict] = []
    for directory in dirs:
        (file,) = directory.glob("run-*.wandb")
        for record in _finished_wandb_records(file, pb):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        series.setdefault(key, []).append((step, float(item.value_json)))
            elif kind == "config":
                update = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.config.update
                }
                update.pop("_wandb", None)
                if update:
                    configs.append(update)
    return dirs, series, configs


def mlflow_run(run: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    """(metric series, params) of the run's MLflow run, read with mlflow's client."""
    mlflow = pytest.importorskip("mlflow")
    state = read_state(run)["mlflow"]
    assert state["tracking_uri"] == (run / "mlruns").resolve().as_uri()
    client = mlflow.tracking.MlflowClient(tracking_uri=state["tracking_uri"])
    data = client.get_run(state["run_id"]).data
    series = {
        key: [(m.step, m.value) for m in client.get_metric_history(state["run_id"], key)]
        for key in data.metrics
    }
    return series, data.params


def trackio_run(run: Path) -> tuple[dict[str, list[tuple[int, float]]], list[dict]]:
    """(metric series, configs) from trackio's SQLite database in ``run/trackio``."""
    (db,) = (run / "trackio").glob("*.db")
    con = sqlite3.connect(db)
    try:
        series: dict[str, list[tuple[int, float]]] = {}
        for step, blob in con.execute("SELECT step, metrics FROM metrics ORDER BY id"):
            for key, value in json.loads(blob).items():
                series.setdefault(key, []).append((step, float(value)))
        configs = [json.loads(blob) for (blob,) in con.execute("SELECT config FROM configs")]
    finally:
        con.close()
    return series, configs


def same_series(got, expected) -> None:
    """Equal steps and values (float32 events to float32 precision). metrics.jsonl writes NaN
    and ±inf as null (read as NaN here): the tracker's value there must be non-finite too."""
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for key, points in expected.items():
        assert [s for s, _ in got[key]] == [s for s, _ in points], key
        values, truth = np.array([v for _, v in got[key]]), np.array([v for _, v in points])
        null = np.isnan(truth)
        assert (~np.isfinite(values[null])).all(), (key, values)
        np.testing.assert_allclose(values[~null], truth[~null], rtol=1e-6, err_msg=key)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_report_to_values():
    assert normalize_report_to(None) == normalize_report_to("none") == normalize_report_to([]) == []
    assert normalize_report_to("WandB") == ["wandb"]
    assert normalize_report_to(["mlflow", "tensorboard", "mlflow"]) == ["mlflow", "tensorboard"]
    assert RunConfig().report_to == ["tensorboard"]  # today's behaviour by default
    cfg = load_config(RunConfig, overrides=["report_to=[wandb, mlflow]"])
    assert cfg.report_to == ["wandb", "mlflow"]
    assert load_config(RunConfig, overrides=["report_to=none"]).report_to == []
    assert load_config(RunConfig, overrides=["report_to=trackio"]).report_to == ["trackio"]
    with pytest.raises(ConfigError, match=r"unknown tracker 'comet'; choose from tensorboard, "):
        load_config(RunConfig, overrides=["report_to=[wandb, comet]"])
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        normalize_report_to(["none", "wandb"])


def test_flat_config():
    flat = flat_config({"a": 1, "peft": {"r": 8, "mods": ["q", "v"]}, "x": None, "e": {}})
    assert flat == {"a": 1, "peft.r": 8, "peft.mods": '["q", "v"]', "x": "null", "e": "{}"}


def test_unknown_tracker_and_missing_package_fail_before_anything_is_written(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown tracker 'comet'"):
        RunDir(tmp_path / "a", report_to=["comet"])
    real = trackers_module.importlib.util.find_spec
    monkeypatch.setattr(
        trackers_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "wandb" else real(name, *a),
    )
    cfg = LoopConfig(output_dir=str(tmp_path / "b"), report_to=["tensorboard", "wandb"])
    with pytest.raises(ConfigError, match=r"'wandb' package, which is not installed: pip install"):
        RunDir.from_config(cfg)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_missing_package_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    """The trainer opens the run directory (and checks report_to) before loading the model: a
    model path that does not exist is not reached."""
    from tether.train.dpo import DPOConfig, train

    monkeypatch.setattr(trackers_module.importlib.util, "find_spec", lambda name, *a: None)
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n")
    cfg = DPOConfig(
        model=str(tmp_path / "no-such-model"),
        train_data=str(data),
        output_dir=str(tmp_path / "run"),
        report_to=["mlflow"],
    )
    with pytest.raises(ConfigError, match="pip install mlflow"):
        train(cfg)


# ------------------------------------------------------------------------------------------------
# RunDir → each tracker
# ------------------------------------------------------------------------------------------------


def _log_some(run: Path, report_to: list[str]) -> LoopConfig:
    cfg = LoopConfig(output_dir=str(run), beta=0.25, report_to=report_to)
    with RunDir.from_config(cfg) as rd:
        rd.log(1, {"loss": 1.5, "kl/mean": torch.tensor(0.25), "n": np.int64(7), "ok": True})
        rd.log(2, {"loss": math.nan, "kl/mean": math.inf, "n": 8, "ok": False})
        rd.log(3, {"loss": 0.5, "kl/mean": 0.125, "n": 9, "ok": True})
    return cfg


def test_report_to_none_writes_metrics_jsonl_only(tmp_path):
    _log_some(tmp_path / "run", [])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        ".lock",
        "config.yaml",
        "metrics.jsonl",
    ]


def test_tensorboard(tmp_path):
    run = tmp_path / "run"
    _log_some(run, ["tensorboard"])
    same_series(tensorboard_series(run), jsonl_series(run))
    hparams = list((run / "tb").glob("*/hparams.yml"))  # accelerate's copy of the config
    assert len(hparams) == 1
    assert "beta: 0.25" in hparams[0].read_text()
    assert not any((run / name).exists() for name in ("wandb", "mlruns", "trackio", STATE_FILE))


def test_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    _log_some(run, ["wandb"])
    dirs, series, configs = wandb_run(run)
    assert len(dirs) == 1 and dirs[0].name.endswith(read_state(run)["wandb"]["id"])
    same_series(series, jsonl_series(run))
    assert len(configs) == 1  # logged once
    assert configs[0]["beta"] == 0.25 and configs[0]["hidden"] == "[4, 8]"
    assert configs[0]["report_to"] == '["wandb"]'
    assert not (run / "tb").exists()


def test_mlflow_file_store(tmp_path):
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    _log_some(run, ["mlflow"])
    series, params = mlflow_run(run)
    same_series(series, jsonl_series(run))
    assert params["beta"] == "0.25" and params["output_dir"] == str(run)


def test_trackio_local(tmp_path):
    pytest.importorskip("trackio")
    run = tmp_path / "run"
    _log_some(run, ["trackio"])
    series, configs = trackio_run(run)
    same_series(series, jsonl_series(run))
    assert len(configs) == 1 and configs[0]["beta"] == 0.25


def test_a_failing_tracker_is_switched_off_with_a_warning(tmp_path, monkeypatch):
    from accelerate.tracking import TensorBoardTracker

    def broken(self, values, step=None, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(TensorBoardTracker, "log", broken)
    with RunDir(tmp_path, report_to=["tensorboard"]) as rd:
        with pytest.warns(UserWarning, match=r"tensorboard failed to log step 1 \(OSError: disk"):
            rd.log(1, {"a": 1.0})
        rd.log(2, {"a": 2.0})
        assert rd._trackers.active == {}
    assert [r["a"] for r in read_metrics(tmp_path)] == [1.0, 2.0]


def test_only_the_main_process_starts_trackers(tmp_path):
    class NotMain:
        is_main_process = False
        num_processes = 2
        trackers: list = []

        def wait_for_everyone(self) -> None:
            return None

    with RunDir(tmp_path, NotMain(), report_to=["tensorboard", "mlflow"]) as rd:
        rd.log(1, {"a": 1.0})
        assert rd._trackers.active == {}
    assert not (tmp_path / "tb").exists() and not (tmp_path / "mlruns").exists()


def test_the_accelerator_sees_the_trackers_while_the_run_is_open(tmp_path):
    from tether.train.common import make_accelerator

    cfg = LoopConfig(output_dir=str(tmp_path), report_to=["tensorboard"], mixed_precision="no")
    acc = make_accelerator(cfg)
    with RunDir.from_config(cfg, acc) as rd:
        rd.log(1, {"a": 1.0})
        assert acc.get_tracker("tensorboard") is rd._trackers.active["tensorboard"]
        acc.log({"b": 2.0}, step=1)  # user code may log through accelerate too
    assert acc.trackers == []
    assert tensorboard_series(tmp_path)["b"] == [(1, 2.0)]


@pytest.mark.filterwarnings("error::tether.errors.TetherWarning")
def test_resume_continues_the_trackers_runs(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    pytest.importorskip("trackio")
    names = ["tensorboard", "wandb", "mlflow", "trackio"]
    model = nn.Linear(2, 2)
    cfg = LoopConfig(output_dir=str(tmp_path), report_to=names)
    with RunDir.from_config(cfg) as rd:
        for step in range(1, 5):
            rd.log(step, {"loss": float(step)})
            if step == 2:
                rd.save(step, models={"m": model})
    first = read_state(tmp_path)
    resumed = LoopConfig(output_dir=str(tmp_path), report_to=names, resume=True)
    with RunDir.from_config(resumed) as rd:
        assert rd.restore(models={"m": model})[0] == 2
        for step in (3, 4):
            rd.log(step, {"loss": 10.0 * step})
    assert read_state(tmp_path) == first  # the same W&B / MLflow / trackio runs
    expected = [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert jsonl_series(tmp_path)["loss"] == expected
    # W&B: a second offline directory with the same id (wandb sync appends it to the run)
    dirs, series, configs = wandb_run(tmp_path)
    assert len(dirs) == 2 and all(f"-{first['wandb']['id']}" in d.name for d in dirs)
    assert series["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (3, 30.0), (4, 40.0)]
    # MLflow: the same run holds both attempts' values; trackio: the same run continues
    mlflow_series, params = mlflow_run(tmp_path)
    assert sorted(mlflow_series["loss"]) == sorted(series["loss"])
    assert params["resume"] == "False"  # MLflow keeps a param's first value (config.yaml: now)
    assert trackio_run(tmp_path)[0]["loss"][-2:] == [(3, 30.0), (4, 40.0)]
    assert tensorboard_series(tmp_path)["loss"] == expected  # purged after the checkpoint


# ------------------------------------------------------------------------------------------------
# Trainers end to end
# ------------------------------------------------------------------------------------------------


def test_dpo_run_reports_to_every_tracker(tiny_dir, tmp_path):
    """A tiny DPO run with all four trackers: each holds exactly metrics.jsonl's series (train
    and eval metrics) and the resolved config, once."""
    for name in ("wandb", "mlflow", "trackio"):
        pytest.importorskip(name)
    from tether.train.dpo import DPOConfig, train

    rows = [
        {"prompt": f"Review {i}: it was", "chosen": " good, good", "rejected": " bad, bad"}
        for i in range(20)
    ]
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "run"
    cfg = DPOConfig(
        model=str(tiny_dir),
        train_data=str(data),
        output_dir=str(run),
        reference="copy",
        batch_size=4,
        max_steps=3,
        logging_steps=1,
        eval_steps=3,
        save_steps=0,
        max_length=48,
        max_prompt_length=32,
        eval_generate=False,
        mixed_precision="no",
        report_to=["tensorboard", "wandb", "mlflow", "trackio"],
        tracker_project="tether-test",
        run_name="dpo-tiny",
    )
    train(cfg)
    expected = jsonl_series(run)
    assert {"loss", "eval/loss"} <= set(expected) and len(expected["loss"]) == 3
    same_series(tensorboard_series(run), expected)
    _, wandb_series, wandb_configs = wandb_run(run)
    same_series(wandb_series, expected)
    mlflow_series, params = mlflow_run(run)
    same_series(mlflow_series, expected)
    trackio_series, trackio_configs = trackio_run(run)
    same_series(trackio_series, expected)
    assert (run / "trackio" / "tether-test.db").is_file()
    assert len(wandb_configs) == 1 and wandb_configs[0]["beta"] == cfg.beta
    assert float(params["beta"]) == cfg.beta and params["reference"] == "copy"
    assert len(trackio_configs) == 1 and trackio_configs[0]["model"] == str(tiny_dir)
    assert len(list((run / "tb").glob("*/hparams.yml"))) == 1
    assert json.loads((run / STATE_FILE).read_text())["trackio"]["name"] == "dpo-tiny"


def test_control_run_reports_to_mlflow(tmp_path):
    """The control trainers (no accelerator) use the same run directory and trackers."""
    pytest.importorskip("gymnasium")
    pytest.importorskip("mlflow")
    from tether.control.config import PPOControlConfig
    from tether.control.train import train

    run = tmp_path / "run"
    cfg = PPOControlConfig(
        output_dir=str(run),
        n_envs=2,
        n_steps=32,
        batch_size=32,
        n_epochs=1,
        max_steps=2,
        eval_episodes=2,
        report_to=["mlflow"],
    )
    train(cfg)
    expected = jsonl_series(run)
    assert "eval_return" in expected and len(expected["episode_return"]) == 2
    series, params = mlflow_run(run)
    same_series(series, expected)
    assert params["env"] == "CartPole-v1"
    assert not (run / "tb").exists()
