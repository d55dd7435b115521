"""Sharded (FSDP2) checkpoints: written collectively, atomic under a failing write, restored
exactly, refused with non-finite shards; on 2 gloo processes and on a world of one. The checks
run in their own processes (tests/helpers/sharded_checkpoint.py): they create a process group."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("nproc", [1, 2])
def test_sharded_checkpoint_round_trip_and_failures(tmp_path, nproc):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    helper = ["-m", "tests.helpers.sharded_checkpoint", str(tmp_path / "run")]
    launch = [
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_port()}",
    ]
    cmd = [sys.executable, *(launch if nproc > 1 else []), *helper]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    if nproc == 2:
        shards = list((tmp_path / "run" / "checkpoints" / "step-000001" / "model").glob("*.distcp"))
        assert len(shards) == 2, shards
