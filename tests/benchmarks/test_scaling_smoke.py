"""Smoke run of ``benchmarks/scaling.py --sharding fsdp2`` on the tiny model (2 steps of DPO and
GRPO on 1 process, 2 DDP processes and 2 FSDP2 processes), so a change that breaks the benchmark
fails here; and what it measures: FSDP2 holds about half the model state per rank that DDP does,
and trains as one process does."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_dir):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scaling

    out = tmp_path_factory.mktemp("scaling") / "scaling.json"
    argv = ["--sharding", "fsdp2", "--steps", "2", "--model", str(tiny_dir), "--out", str(out)]
    argv += ["--dpo-lengths", "512,256"]
    return scaling.main(argv)


@pytest.mark.parametrize("trainer", ["dpo", "grpo"])
def test_fsdp2_halves_the_model_state_per_rank(results, trainer):
    res = results[trainer]
    assert res["model_state_ratio"] <= 0.55, res["memory_mib"]
    ddp, fsdp = res["memory_mib"]["ddp"], res["memory_mib"]["fsdp2"]
    for rank in (0, 1):
        # every rank holds half of every parameter (dim-0 shards), its gradients and moments
        assert fsdp["params"][rank] == pytest.approx(ddp["params"][rank] / 2, rel=0.05)
        assert fsdp["optimizer"][rank] == pytest.approx(ddp["optimizer"][rank] / 2, rel=0.05)
        assert fsdp["peak_rss"][rank] > 0


@pytest.mark.parametrize("trainer", ["dpo", "grpo"])
def test_ddp_and_fsdp2_train_as_one_process(results, trainer):
    res = results[trainer]
    for diffs in (res["max_abs_diff"], res["max_abs_diff_fsdp2"]):
        assert diffs["weights (max |Δ|)"] < 5e-5, diffs
        assert all(v < 1e-4 for k, v in diffs.items()), diffs


def test_the_readme_tables_render_from_the_results(results):
    import scaling

    table = scaling.markdown(results)
    for trainer in ("dpo", "grpo"):
        assert f"| {trainer} | 0 |" in table and f"| {trainer} | 1 |" in table
        assert f"| {trainer} | {results[trainer]['model_state_ratio']:.3f}× |" in table


def test_the_readme_holds_the_recorded_tables():
    """The README's DDP vs FSDP2 tables are the recorded results file, rendered."""
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import scaling

    recorded = json.loads((ROOT / "docs" / "results" / "scaling-fsdp2.json").read_text())
    assert scaling.markdown(recorded) in (ROOT / "README.md").read_text()
