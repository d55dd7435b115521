"""Smoke runs of the tether rows of ``benchmarks/dpo_vs_trl.py`` and ``benchmarks/grpo_vs_trl.py``
on the tiny model (2 steps), so a change to a trainer that breaks a benchmark (a config it no
longer accepts, a function it hooks that moved) fails ``make test``. The TRL rows need the
``bench`` extra (``trl``) and run by hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

RUNS = {
    "dpo_vs_trl.py": ["--batch-size", "2", "--max-length", "64", "--skip-check"],
    "grpo_vs_trl.py": ["--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "8"],
}


@pytest.mark.parametrize("script", sorted(RUNS))
def test_the_tether_rows_run(tmp_path, tiny_dir, script):
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--only", "tether"]
    cmd += ["--model", str(tiny_dir), "--steps", "2", "--warmup", "1", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        cmd + RUNS[script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"tether", "tether-fp32"}, results
    for name, row in results.items():
        assert "error" not in row, (name, row, proc.stdout[-3000:])
        assert row["s_per_step"] > 0 and len(row["step_s"]) >= 1, (name, row)
        if script == "grpo_vs_trl.py":  # the step's time, by stage, from the run's metrics
            assert {"gen_s", "update_s", "ref_s"} <= set(row["breakdown_s"]), row
