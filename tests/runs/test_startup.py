"""Start-up cost: `tether train ALGO --help-config / --print-config` read the config classes from
tether.configs and never import torch (≈10 s of imports); the trainer modules re-export the very
same classes, so training, recipes and tests see one class per algorithm."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

HEAVY = ("torch", "transformers", "accelerate", "datasets")
"""Modules a config-only command must not import."""

PROBE = """
import contextlib, io, json, sys
from tether.cli import main
from tether.runs.registry import TRAINERS
heavy = {heavy!r}
report = {{}}
for name in TRAINERS:
    row = {{}}
    for flag, extra in (("--help-config", []), ("--print-config", {overrides!r})):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main(["train", name, flag, *extra])
        row[flag] = {{"rc": rc, "out": out.getvalue(),
                     "heavy": sorted(m for m in heavy if m in sys.modules)}}
    report[name] = row
print(json.dumps(report))
"""


def _run_probe(overrides: list[str]) -> dict:
    code = PROBE.format(heavy=HEAVY, overrides=overrides)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_help_and_print_config_never_import_torch():
    """Every registered algorithm answers both flags (exit 0) with torch, transformers,
    accelerate and datasets still unimported afterwards; --print-config's YAML loads back into
    the same config (field by field)."""
    from tether.runs.config import config_to_dict, load_config
    from tether.runs.registry import TRAINERS, get_config

    report = _run_probe(["seed=7"])
    assert set(report) == set(TRAINERS)
    for name, row in report.items():
        for flag, result in row.items():
            assert result["rc"] == 0, (name, flag)
            assert result["heavy"] == [], (name, flag, result["heavy"])
        assert "learning_rate" in row["--help-config"]["out"], name
        printed = yaml.safe_load(row["--print-config"]["out"])
        assert printed["seed"] == 7, name
        cls = get_config(name)
        assert config_to_dict(load_config(cls, None, ["seed=7"])) == printed, name


def test_a_bad_override_is_reported_without_torch():
    """A __post_init__ check that used to live beside torch code (the adaptive controller's
    horizon bound, now tether.configs.checks) still rejects a config at --print-config, with
    exit 2 and no torch import."""
    code = (
        "import sys; from tether.cli import main; "
        "rc = main(['train', 'grpo', '--print-config', 'kl_controller=adaptive', "
        "'kl_horizon=1', 'batch_size=8', 'num_generations=8']); "
        f"print(rc, sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split()[0] == "2"
    assert done.stdout.strip().endswith("[]"), done.stdout
    # 0.2 · 8 · 8 = 12.8 samples: the smallest valid horizon is 13, named in the message
    assert "kl_horizon" in done.stderr and "13" in done.stderr, done.stderr


def test_config_modules_import_no_heavy_module():
    """The rule of tether.configs: each module imports none of torch/transformers/accelerate/
    datasets (checked module by module, each in a fresh interpreter)."""
    import pkgutil

    import tether.configs

    names = sorted(m.name for m in pkgutil.iter_modules(tether.configs.__path__))
    assert {"common", "eval", "dpo", "rl", "ppo", "grpo", "trpo"} <= set(names)
    code = (
        "import importlib, json, sys\n"
        f"out = {{}}\nfor n in {names!r}:\n"
        "    importlib.import_module('tether.configs.' + n)\n"
        f"    out[n] = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(json.dumps(out))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(done.stdout) == {n: [] for n in names}


def test_trainer_and_config_module_give_the_same_class():
    """For every algorithm the config-only loader and the trainer loader return the same class
    object (not an equal copy), and the moved shared pieces are the same objects in both homes."""
    import tether.configs.checks as checks
    import tether.configs.common as light_common
    import tether.configs.eval as light_eval
    import tether.configs.literals as literals
    import tether.configs.rl as light_rl
    from tether.core import controllers, kl, losses, masked
    from tether.eval import heldout
    from tether.models import checkpointing, numerics, rollout
    from tether.rewards import ensemble
    from tether.runs.registry import TRAINERS, get_config, get_trainer
    from tether.train import common, rl

    for name in TRAINERS:
        assert get_config(name) is get_trainer(name)[0], name
    assert common.TrainConfig is light_common.TrainConfig
    assert common.SamplingTrainConfig is light_common.SamplingTrainConfig
    assert common.PreferenceDataConfig is light_common.PreferenceDataConfig
    assert heldout.EvalConfig is light_eval.EvalConfig
    assert heldout.reward_names is checks.reward_names
    assert rl.RLConfig is light_rl.RLConfig and rl.KLPlacement is light_rl.KLPlacement
    assert controllers.check_horizon is checks.check_horizon
    assert controllers.smallest_valid_horizon is checks.smallest_valid_horizon
    assert controllers.DEFAULT_MAX_ERROR == checks.DEFAULT_MAX_ERROR
    assert numerics.KL_PRECISION_HELP is literals.KL_PRECISION_HELP
    assert numerics.KLPrecision is literals.KLPrecision
    assert rollout.ROLLOUT_DTYPE_HELP is literals.ROLLOUT_DTYPE_HELP
    assert rollout.RolloutDtype is literals.RolloutDtype
    assert checkpointing.CheckpointMode is literals.CheckpointMode
    assert losses.DPOLossType is literals.DPOLossType
    assert kl.Estimator is literals.Estimator and masked.Aggregation is literals.Aggregation
    assert ensemble.Combine is literals.Combine


def test_dpo_reference_kind_still_resolves():
    """A property that needs torch (DPO's reference_kind resolves mixed_precision) imports it
    lazily and still answers from the light class."""
    from tether.configs.dpo import DPOConfig

    assert DPOConfig(mixed_precision="no").reference_kind == "precomputed"
    assert DPOConfig(mixed_precision="bf16").reference_kind == "copy"
    assert DPOConfig(mixed_precision="bf16", peft={"r": 4}).reference_kind == "adapter"
    assert DPOConfig(reference="synced").reference_kind == "synced"


def test_control_and_lab_help_config_never_import_torch():
    """`tether control ALGO --help-config` and `tether lab overopt --help-config` read their
    config classes without importing torch (the lab's package and the control trainers'
    package import their heavy modules on first use)."""
    code = (
        "import contextlib, io, sys; from tether.cli import main\n"
        "rcs = []\n"
        "for argv in (['control', 'ppo', '--help-config'], ['control', 'trpo', '--help-config'],"
        " ['lab', 'overopt', '--help-config'], ['control', 'ppo', '--print-config']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        rcs.append(main(argv))\n"
        f"print(rcs, sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[0, 0, 0, 0] []", done.stdout + done.stderr
