"""Run several ``tether`` commands in one process (one launch, one import of torch): the jobs of
the multi-process equivalence tests. ``python -m tests.helpers.dist_driver JOBS.json`` where the
file holds a list of argument lists (``["train", "grpo", "key=value", ...]``); under ``torchrun``
every rank runs every job in order. Exits with the first non-zero status."""

import json
import sys

from tether.cli import main as cli


def main(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        jobs = json.load(f)
    for argv in jobs:
        status = cli(argv)
        if status:
            print(f"job failed with status {status}: {argv}", file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
