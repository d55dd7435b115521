"""The ``tether`` command line. Subcommands are added here as the trainers land."""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Sequence
from importlib import metadata

import tether

_REPORTED_PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "safetensors",
    "numpy",
)


def _env(_: argparse.Namespace) -> int:
    """Print the versions and devices a bug report needs (like ``trl env``)."""
    print(f"tether: {tether.__version__}")
    print(f"python: {platform.python_version()} ({platform.platform()})")
    for name in _REPORTED_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{name}: {version}")
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"accelerator: cuda ({torch.cuda.device_count()}): {names}")
    else:
        print("accelerator: none (CPU)")
    print(f"torch threads: {torch.get_num_threads()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="KL-regularised RL and preference optimisation for language models.",
    )
    parser.add_argument("--version", action="version", version=f"tether {tether.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = sub.add_parser("env", help="print library versions and devices (for bug reports)")
    env.set_defaults(func=_env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
