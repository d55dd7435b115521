"""The ``tether`` command line.

tether env                                   versions and devices, for bug reports
tether train ALGO [--config r.yaml] [key=value ...] [--print-config | --help-config]
tether plot RUN_DIR [--out file.png] [--keys a,b]
"""

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


def _train(args: argparse.Namespace) -> int:
    """Resolve the algorithm's config from the YAML file and overrides, then train."""
    from tether.runs.config import ConfigError, describe_config, dump_config, load_config
    from tether.runs.registry import UnknownTrainerError, get_trainer

    try:
        config_cls, train_fn = get_trainer(args.algo)
        if args.help_config:
            print(describe_config(config_cls))
            return 0
        config = load_config(config_cls, args.config, args.overrides)
    except (ConfigError, UnknownTrainerError) as exc:
        print(f"tether train: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    train_fn(config)
    return 0


def _plot(args: argparse.Namespace) -> int:
    """Draw a run's metrics.jsonl to a PNG and print its path."""
    from tether.runs.plot import plot_run

    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    try:
        out = plot_run(args.run_dir, out=args.out, keys=keys)
    except (FileNotFoundError, ValueError) as exc:
        print(f"tether plot: error: {exc}", file=sys.stderr)
        return 2
    print(out)
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

    train = sub.add_parser(
        "train",
        help="train with an algorithm: tether train ALGO --config r.yaml [key=value ...]",
        description="Train with ALGO. The config is the algorithm's defaults, then the YAML file, "
        "then the key=value overrides in order (dotted keys reach nested configs; values are "
        "parsed as YAML: lr=1e-5, peft=null, tags=[a,b]).",
    )
    train.add_argument("algo", metavar="ALGO", help="the algorithm (an unknown name lists them)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    train.add_argument("-c", "--config", metavar="YAML", help="a YAML recipe for ALGO's config")
    train.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config as YAML and exit without training",
    )
    train.add_argument(
        "--help-config",
        action="store_true",
        help="list ALGO's config fields with their types, defaults and help, and exit",
    )
    train.set_defaults(func=_train)

    plot = sub.add_parser("plot", help="draw a run's metrics.jsonl to a PNG")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    plot.add_argument("--out", metavar="PNG", help="image path (default RUN_DIR/metrics.png)")
    plot.add_argument("--keys", metavar="A,B", help="comma-separated metrics to draw")
    plot.set_defaults(func=_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tether`` command line on ``argv`` (default ``sys.argv[1:]``); return the exit
    status."""
    parser = build_parser()
    # argparse gives a trailing nargs="*" positional only the words before the first option, so
    # `train ALGO a=1 --config r.yaml b=2` leaves b=2 unparsed: collect such words as overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) != "train" or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
