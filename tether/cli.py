"""The ``tether`` command line.

tether env                                   versions and devices, for bug reports
tether train ALGO [--config r.yaml] [key=value ...] [--print-config | --help-config]
tether plot RUN_DIR [--out file.png] [--keys a,b]
tether report RUN_DIR [RUN_DIR ...] [--out report.html] [--steps 0,40,80]
tether bon --model M --prompts FILE [--reward vader] [--n 8] [--out picks.jsonl] [...]
tether generate RUN_OR_MODEL --prompts FILE [--n 1] [--reward SPEC ...] [--out responses.jsonl]
tether eval RUN_OR_MODEL [--prompts FILE] [--reward SPEC] [--eval-reward SPEC ...] [--out eval.json]
tether export RUN_DIR [--out DIR] [--checkpoint final|best|step-N] [--dtype float32]
tether control {ppo,ppo_penalty,trpo} [--env CartPole-v1] [--config r.yaml] [key=value ...]
tether control eval RUN_DIR [--episodes 10] [--stochastic]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

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


_PROMPTS_HELP = (
    "a .jsonl/.json/.csv/.parquet file, a HF dataset dir (save_to_disk or hub layout) or a cached "
    "hub id org/name; SOURCE:SPLIT or SOURCE:CONFIG:SPLIT picks a split (default train)"
)


def _check_file(option: str, value: str) -> None:
    """A data source named on the command line (a data file, a HuggingFace dataset directory or
    a cached hub id, ``:SPLIT``) exists and is readable (checked before any model loads)."""
    from tether.data.sources import check_source

    check_source(option, value)


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
    from tether.runs.registry import UnknownTrainerError, get_config, get_trainer

    try:
        config_cls = get_config(args.algo)  # tether.configs: the two flags never import torch
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
    if os.environ.get("RANK", "0") == "0":  # a first line at once: the imports take seconds
        print(f"tether train {args.algo}: {config.output_dir}: loading the trainer", flush=True)
    _, train_fn = get_trainer(args.algo)  # the trainer module (torch), only to train
    train_fn(config)
    return 0


def _plot(args: argparse.Namespace) -> int:
    """Draw a run's metrics.jsonl to a PNG and print its path."""
    from tether.runs.plot import plot_run

    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    panels = [p.strip() for p in args.panels.split(",") if p.strip()] if args.panels else None
    try:
        out = plot_run(args.run_dir, out=args.out, keys=keys, panels=panels)
    except (FileNotFoundError, ValueError) as exc:
        print(f"tether plot: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _lab(args: argparse.Namespace) -> int:
    """``tether lab overopt``: run (or resume) the over-optimisation lab, or redraw its report."""
    from tether.lab.config import LabConfig
    from tether.runs.config import ConfigError, describe_config, dump_config, load_config

    if args.help_config:
        print(describe_config(LabConfig))
        return 0
    if args.report_only:
        from tether.lab.report import write_lab_report

        try:
            print(write_lab_report(args.report_only))
        except (OSError, ValueError) as exc:
            print(f"tether lab: error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        config = load_config(LabConfig, args.config, args.overrides)
        config.check_trainer_fields()
        if not args.print_config:
            config.check_paths()
    except (ConfigError, ValueError) as exc:
        print(f"tether lab: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    from tether.data.chat import ChatTemplateError
    from tether.data.errors import DataError
    from tether.lab.overopt import run_lab, summary_table
    from tether.rewards.base import RewardError

    try:
        results = run_lab(config)
    except (DataError, RewardError, ChatTemplateError, ConfigError) as exc:
        print(f"tether lab: error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(results))
    if config.report:
        print(f"report: {Path(config.output_dir) / 'report.html'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    """Write a self-contained HTML report of one or more runs and print its path."""
    from tether.eval.report import write_report

    try:
        steps = (
            [int(s) for s in args.steps.split(",") if s.strip()] if args.steps is not None else None
        )
    except ValueError:
        print(
            f"tether report: error: --steps takes comma-separated integers, got {args.steps!r}",
            file=sys.stderr,
        )
        return 2
    try:
        out = write_report(args.run_dirs, out=args.out, steps=steps)
    except (OSError, ValueError) as exc:
        print(f"tether report: error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def _bon(args: argparse.Namespace) -> int:
    """Best-of-n on a prompt file: print mean rewards and the KL to the base policy; write picks."""
    import torch

    from tether.bon import best_of_n, first_order_bias
    from tether.data import load_prompt_dataset
    from tether.models import SamplingConfig, load_policy
    from tether.rewards import make_reward

    try:
        sampling = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
        )
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be ≥ 1, got {args.limit}")
        reward = make_reward(args.reward)
        from tether.eval.heldout import reward_names

        gold_specs = list(args.eval_reward or [])
        gold = {
            name: make_reward(spec)
            for name, spec in zip(reward_names(gold_specs), gold_specs, strict=True)
        }
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        _check_file("--prompts", args.prompts)  # before the model loads
        policy = load_policy(args.model, device=device)
        data = load_prompt_dataset(
            args.prompts,
            policy.tokenizer,
            prompt_field=args.prompt_field,
            max_prompt_length=args.max_prompt_length,
            as_chat=args.as_chat,
        )
        examples = data[: args.limit]
        result = best_of_n(
            policy.model,
            policy.tokenizer,
            [e.prompt_ids for e in examples],
            reward,
            args.n,
            sampling,
            calibration=args.calibration,
            seed=args.seed,
            prompts=[e.prompt for e in examples],
            batch_size=args.batch_size,
            gold_rewards=gold,
        )
    except (ValueError, ImportError, OSError) as exc:  # DataError and RewardError included
        print(f"tether bon: error: {exc}", file=sys.stderr)
        return 2
    kl = result.kl
    bias = first_order_bias(result.n, result.calibration)
    rows = [
        ("prompts", f"{len(examples)}"),
        ("n", f"{result.n}"),
        ("mean reward, plain samples", f"{result.mean_reward_plain:.4f}"),
        ("mean reward, best-of-n", f"{result.mean_reward_bon:.4f}"),
        ("KL bound log n − (n−1)/n", f"{result.kl_bound:.4f}"),
        ("KL estimate ± SE", f"{kl.mean:.4f} ± {kl.stderr:.4f}"),
    ]
    for name in result.gold:
        rows.append((f"gold {name}, plain samples", f"{result.gold_plain(name):.4f}"))
        rows.append((f"gold {name}, best-of-n", f"{result.gold_bon(name):.4f}"))
        rows.append((f"proxy–gold gap ({name}, σ units)", f"{result.proxy_gold_gap(name):.3f}"))
    width = max(len(name) for name, _ in rows)
    print(f"best-of-{result.n} with reward {args.reward!r} on {args.prompts}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(
        f"  (KL estimated from {result.calibration} calibration samples per prompt; for a reward "
        f"without ties it is\n   biased low by ≈ (n−1)/(2·calibration) = {-bias:.4f}. Ties make "
        "the true KL smaller than the bound.)"
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as f:
            for i, (e, completion, reward_value, rewards) in enumerate(
                zip(examples, result.completions, result.pick_rewards, result.rewards, strict=True)
            ):
                record = {
                    "index": e.index,
                    "prompt": e.prompt,
                    "completion": completion,
                    "reward": reward_value,
                    "candidate_rewards": rewards,
                }
                for name, values in result.gold.items():
                    record[f"gold/{name}"] = values[i][result.picks[i]]
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"picks written to {out}")
    return 0


def _device(requested: str | None) -> str:
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def _sampling_from(args: argparse.Namespace, run: dict[str, Any]) -> Any:
    """Sampling options: the flag, else the run's config, else the defaults."""
    from tether.models import SamplingConfig

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        return value if value is not None else run.get(name, default)

    return SamplingConfig(
        max_new_tokens=pick("max_new_tokens", 48),
        temperature=pick("temperature", 1.0),
        top_k=pick("top_k", 0),
        top_p=pick("top_p", 1.0),
    )


def _run_rewards(run: dict[str, Any]) -> list[str]:
    """A run's training reward and its gold rewards (the default rewards of generate)."""
    specs = [run["reward"]] if isinstance(run.get("reward"), str) and run.get("reward") else []
    specs += [s for s in run.get("eval_rewards") or [] if isinstance(s, str) and s not in specs]
    return specs


def _generate(args: argparse.Namespace) -> int:
    """Sample responses of a trained model to a prompt file; rewards and KL per response."""
    from tether.data import load_prompt_dataset
    from tether.eval.heldout import reward_names
    from tether.generate import NamedReward, format_summary, generate_rows, summarize, write_jsonl
    from tether.rewards import make_reward
    from tether.trained import load_trained, resolve_reference, resolve_trained

    try:
        for name in ("n", "batch_size", "limit"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
        _check_file("--prompts", args.prompts)  # before any model loads
        trained = resolve_trained(args.model, args.checkpoint)
        run = trained.run_config or {}
        sampling = _sampling_from(args, run)
        as_chat = args.as_chat if args.as_chat is not None else bool(run.get("as_chat", False))
        specs = list(args.reward) if args.reward else _run_rewards(run)
        specs = [] if specs == ["none"] else specs
        rewards = [
            NamedReward(name, spec, make_reward(spec))
            for name, spec in zip(reward_names(specs), specs, strict=True)
        ]
        device = _device(args.device)
        policy = load_trained(trained, device=device)
        reference = resolve_reference(trained, policy, args.reference, device=device)
        data = load_prompt_dataset(
            args.prompts,
            policy.tokenizer,
            prompt_field=args.prompt_field,
            max_prompt_length=args.max_prompt_length or run.get("max_prompt_length"),
            as_chat=as_chat,
        )
        examples = list(data)[: args.limit]
        print(
            f"tether generate: {len(examples)} prompts × {args.n} from {trained.describe()}; "
            f"reference: {reference.name if reference else 'none'}",
            file=sys.stderr,
        )
        from tether.runs.progress import Progress

        total = len(examples) * args.n
        # a bar on a terminal, one plain line per batch otherwise (as the trainers do)
        with Progress(total, description="generate") as bar:
            rows = generate_rows(
                policy.model,
                policy.tokenizer,
                examples,
                sampling,
                n=args.n,
                rewards=rewards,
                reference=reference.policy if reference else None,
                batch_size=args.batch_size,
                seed=args.seed,
                on_batch=lambda done: bar.update(done, {"responses": f"{done}/{total}"}),
            )
    except (ValueError, ImportError, OSError) as exc:  # DataError, RewardError, ModelError too
        print(f"tether generate: error: {exc}", file=sys.stderr)
        return 2
    out = write_jsonl(args.out, rows)
    stats = summarize(rows)
    print(f"{len(rows)} responses ({len(examples)} prompts × {args.n}) written to {out}")
    kl_to = f"; kl/*: KL to {reference.name}" if reference is not None else ""
    print(f"per response, mean ± standard error{kl_to}:")
    for line in format_summary(stats):
        print(line)
    return 0


def _eval(args: argparse.Namespace) -> int:
    """The held-out evaluation of a saved model: metrics JSON, samples JSONL and a table."""
    from tether.data import load_prompt_dataset
    from tether.eval.standalone import (
        eval_config,
        evaluate_once,
        format_table,
        report,
        run_eval_prompts,
        write_json,
    )
    from tether.generate import write_jsonl
    from tether.trained import load_trained, resolve_reference, resolve_trained

    try:
        if args.prompts:
            _check_file("--prompts", args.prompts)
        trained = resolve_trained(args.model, args.checkpoint)
        run = trained.run_config or {}
        if trained.run_config is None and not args.prompts:
            raise ValueError("--prompts is required for a model that is not a tether run")
        overrides = {
            "eval_num_prompts": args.num_prompts,
            "eval_samples_per_prompt": args.samples_per_prompt,
            "eval_rewards": list(args.eval_reward) if args.eval_reward else None,
            "eval_batch_size": args.batch_size,
            "eval_capability_text": args.capability_text,
            "eval_offtask_prompts": args.offtask_prompts,
            "eval_semantic": False if args.no_semantic else None,
            "eval_max_new_tokens": None,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "seed": args.seed,
            "as_chat": args.as_chat,
            "max_prompt_length": args.max_prompt_length,
        }
        cfg = eval_config(run, overrides)
        for name in ("eval_capability_text", "eval_offtask_prompts"):
            if getattr(cfg, name) == "none":
                setattr(cfg, name, None)
        proxy = args.reward if args.reward is not None else run.get("reward")
        proxy = None if proxy in (None, "", "none") else str(proxy)
        device = _device(args.device)
        policy = load_trained(trained, device=device)
        reference = resolve_reference(trained, policy, args.reference, device=device)
        if args.prompts:
            prompts = list(
                load_prompt_dataset(
                    args.prompts,
                    policy.tokenizer,
                    max_prompt_length=cfg.max_prompt_length,
                    as_chat=cfg.as_chat,
                )
            )
            if args.num_prompts is None:
                cfg.eval_num_prompts = len(prompts)
            where = args.prompts
        else:
            prompts, where = run_eval_prompts(run, cfg, policy.tokenizer)
        print(
            f"tether eval: {trained.describe()} on {min(len(prompts), cfg.eval_num_prompts)} "
            f"prompts × {cfg.eval_samples_per_prompt}; reference: "
            f"{reference.name if reference else 'none'}",
            file=sys.stderr,
        )
        metrics, records = evaluate_once(
            policy.model,
            policy.tokenizer,
            reference.policy if reference else None,
            cfg,
            prompts,
            proxy,
            step=trained.step or 0,
        )
    except (ValueError, ImportError, OSError) as exc:
        print(f"tether eval: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    samples = Path(args.samples) if args.samples else out.with_name(out.stem + ".samples.jsonl")
    write_jsonl(samples, records)
    data = report(
        model=args.model,
        checkpoint=trained.checkpoint,
        step=trained.step,
        reference=reference.name if reference else None,
        prompts=where,
        cfg=cfg,
        proxy=proxy,
        metrics=metrics,
        samples=str(samples),
    )
    write_json(out, data)
    print(f"held-out evaluation of {trained.describe()} ({len(records)} samples)")
    for line in format_table(metrics):
        print(line)
    print(f"metrics written to {out}, samples to {samples}")
    return 0


def _export(args: argparse.Namespace) -> int:
    """Write a run's model as a plain HF model directory (a LoRA adapter merged)."""
    from tether.export import export_run

    try:
        result = export_run(args.run_dir, args.out, checkpoint=args.checkpoint, dtype=args.dtype)
    except (ValueError, ImportError, OSError) as exc:
        print(f"tether export: error: {exc}", file=sys.stderr)
        return 2
    how = "LoRA adapter merged into its base" if result.merged_adapter else "full model"
    print(
        f"exported {result.trained.describe()} ({how}, {result.parameters:,} parameters, "
        f"{result.dtype}) to {result.out}"
    )
    return 0


def _control(args: argparse.Namespace) -> int:
    """Train a control policy (ppo | ppo_penalty | trpo) on a gymnasium task, or evaluate one."""
    if args.algo == "eval":
        return _control_eval(args)
    from tether.control.config import CONFIGS as ALGORITHMS
    from tether.runs.config import ConfigError, describe_config, dump_config, load_config

    if args.algo not in ALGORITHMS:
        known = ", ".join([*ALGORITHMS, "eval"])
        print(f"tether control: error: unknown {args.algo!r}; one of: {known}", file=sys.stderr)
        return 2
    cls = ALGORITHMS[args.algo]
    if args.help_config:
        print(describe_config(cls))
        return 0
    overrides = list(args.overrides)
    if args.env:
        overrides.insert(0, f"env={args.env}")
        if not _sets_output_dir(args.config, overrides):
            # each --env run gets its own directory, the one the recipes use: runs/control/ALGO-ENV
            overrides.insert(0, f"output_dir={control_run_dir(args.algo, args.env)}")
    try:
        config = load_config(cls, args.config, overrides)
    except ConfigError as exc:
        print(f"tether control: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    try:
        from tether.control.train import train

        final = train(config)
    except (ValueError, ImportError) as exc:
        print(f"tether control: error: {exc}", file=sys.stderr)
        return 2
    shown = ("env_steps", "episode_return", "eval_return", "fps")
    print(" ".join(f"{k}={final[k]:.6g}" for k in shown if k in final))
    return 0


def control_run_dir(algo: str, env: str) -> str:
    """``runs/control/ALGO-ENV`` for ``tether control ALGO --env ENV`` (ENV lower-cased, without
    its ``-vN`` version and namespace): ppo on CartPole-v1 → ``runs/control/ppo-cartpole``."""
    name = env.rsplit("/", 1)[-1]
    base, sep, version = name.rpartition("-v")
    if sep and version.isdigit():
        name = base
    slug = "".join(c if c.isalnum() or c in "_-." else "-" for c in name.lower())
    return f"runs/control/{algo}-{slug}"


def _sets_output_dir(config: str | None, overrides: Sequence[str]) -> bool:
    """Whether the user chose output_dir: an ``output_dir=`` override or a key in the recipe."""
    if any(o.split("=", 1)[0].strip() == "output_dir" for o in overrides):
        return True
    if config is None:
        return False
    try:
        import yaml

        data = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # load_config reports the file's problem
    return isinstance(data, dict) and "output_dir" in data


def _control_eval(args: argparse.Namespace) -> int:
    import statistics

    if len(args.overrides) != 1 or "=" in args.overrides[0]:
        print("tether control eval: error: give one RUN_DIR", file=sys.stderr)
        return 2
    try:
        from tether.control import evaluate_policy, load_run

        cfg, policy, obs_norm = load_run(args.overrides[0])
        returns = evaluate_policy(
            policy,
            obs_norm,
            args.env or cfg.env,
            args.episodes,
            args.seed,
            cfg.env_kwargs,
            deterministic=not args.stochastic,
        )
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"tether control eval: error: {exc}", file=sys.stderr)
        return 2
    mode = "stochastic" if args.stochastic else "deterministic"
    std = statistics.pstdev(returns)
    print(
        f"{cfg.env}: mean return {statistics.fmean(returns):.2f} ± {std:.2f} "
        f"over {len(returns)} {mode} episodes"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="KL-regularised RL and preference optimisation for language models.",
    )
    parser.add_argument("--version", action="version", version=f"tether {tether.__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of an error (same as {DEBUG_ENV}=1); may go anywhere",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = sub.add_parser("env", help="print library versions and devices (for bug reports)")
    env.set_defaults(func=_env)

    from tether.runs.registry import algorithms_help

    train = sub.add_parser(
        "train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=algorithms_help()
        + "\n\nALGO --help-config lists the algorithm's config fields; see README 'Reliability' "
        "for resume, overwrite and resume_override.",
        help="train with an algorithm: tether train ALGO --config r.yaml [key=value ...]",
        description="Train with ALGO. The config is the algorithm's defaults, then the YAML\n"
        "file, then the key=value overrides in order (dotted keys reach nested configs;\n"
        "values are parsed as YAML: lr=1e-5, peft=null, tags=[a,b]).",
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
    plot.add_argument(
        "--panels",
        metavar="P,Q",
        help="comma-separated panels to draw: reward, fraction, diversity, kl, kl_update, beta, "
        "loss, entropy, logp, lr, norm, time, throughput, count, progress, other",
    )
    plot.set_defaults(func=_plot)

    lab = sub.add_parser(
        "lab",
        help="the over-optimisation lab: tether lab overopt -c recipes/lab/demo.yaml",
        description="Gao et al.'s reward over-optimisation experiment: proxies trained on gold "
        "labels, best-of-n and trained arms against them, Gao's fits, four claims tested, "
        "results.json and report.html. Every stage is cached; re-running resumes.",
    )
    lab.add_argument("experiment", choices=["overopt"], help="the experiment (overopt)")
    lab.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    lab.add_argument("-c", "--config", metavar="YAML", help="a lab recipe (recipes/lab/*.yaml)")
    lab.add_argument("--help-config", action="store_true", help="list every lab config field")
    lab.add_argument("--print-config", action="store_true", help="print the resolved config")
    lab.add_argument(
        "--report-only", metavar="LAB_DIR", help="redraw LAB_DIR/report.html from results.json"
    )
    lab.set_defaults(func=_lab)

    report = sub.add_parser(
        "report",
        help="write a self-contained HTML report (charts and samples) of one or more runs",
        description="Write one HTML file that opens offline: reward, √KL, KL, diversity and "
        "capability charts with the runs overlaid, and samples coloured by per-token KL.",
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    report.add_argument("--out", metavar="HTML", help="report path (default RUN_DIR/report.html)")
    report.add_argument(
        "--steps",
        metavar="A,B",
        help="sample steps to show (default: the first, middle and last samples step)",
    )
    report.set_defaults(func=_report)

    bon = sub.add_parser(
        "bon",
        help="best-of-n sampling: mean rewards and the KL to the base policy",
        description="Sample N completions per prompt, keep the highest-reward one, and report "
        "the mean reward of plain and best-of-n samples, the analytic KL bound log n − (n−1)/n "
        "and a Monte-Carlo estimate of the actual KL(π_BoN‖π) from calibration samples.",
    )
    bon.add_argument("--model", required=True, help="embedded model name, local dir or hub id")
    bon.add_argument("--prompts", required=True, metavar="SOURCE", help=_PROMPTS_HELP)
    bon.add_argument(
        "--reward",
        default="vader",
        help="built-in name (an unknown one lists them), reward-model dir or module:function "
        "(default: %(default)s)",
    )
    bon.add_argument(
        "--eval-reward",
        action="append",
        metavar="SPEC",
        help="a gold reward measured on the candidates, never used to pick (repeatable): its "
        "mean over plain samples and over the picks, and the proxy–gold gap",
    )
    bon.add_argument(
        "--n", type=int, default=8, help="candidates per prompt (default: %(default)s)"
    )
    bon.add_argument(
        "--max-new-tokens", type=int, default=48, help="response length cap (default: %(default)s)"
    )
    bon.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)"
    )
    bon.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    bon.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0 = off)")
    bon.add_argument(
        "--calibration",
        type=int,
        default=16,
        help="extra samples per prompt for the KL estimate (default: %(default)s)",
    )
    bon.add_argument("--limit", type=int, help="use only the first LIMIT prompts")
    bon.add_argument("--prompt-field", default="prompt", help="the prompt column of the file")
    bon.add_argument("--max-prompt-length", type=int, help="longer prompts (tokens) are errors")
    bon.add_argument("--as-chat", action="store_true", help="apply the chat template to prompts")
    bon.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="sequences per generate call (default: %(default)s)",
    )
    bon.add_argument("--device", help="where to run the model (default: cuda if available)")
    bon.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    bon.add_argument("--out", metavar="JSONL", help="write one line per prompt with its pick")
    bon.set_defaults(func=_bon)

    model_help = (
        "a run directory (its final/; see --checkpoint), a model directory (full or LoRA "
        "adapter), an embedded name (smollm2-135m-instruct) or a hub id"
    )
    checkpoint_help = "for a run: final (default), best, latest or step-N"
    reference_help = (
        "the model the KL is measured against (default: a run's configured base model, a LoRA "
        "adapter's base; none: no KL)"
    )

    def sampling_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--max-new-tokens", type=int, help="response length cap (default: the run's, else 48)"
        )
        p.add_argument("--temperature", type=float, help="sampling temperature (default: 1)")
        p.add_argument("--top-k", type=int, help="top-k sampling (0 = off)")
        p.add_argument("--top-p", type=float, help="nucleus sampling (1.0 = off)")
        p.add_argument(
            "--as-chat",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="apply the chat template to plain prompts (default: as the run did)",
        )
        p.add_argument("--max-prompt-length", type=int, help="longer prompts (tokens) are errors")
        p.add_argument("--device", help="where to run the models (default: cuda if available)")

    gen = sub.add_parser(
        "generate",
        help="sample a trained model's responses to a prompt file: rewards and KL per response",
        description="Sample N responses per prompt (fp32), score them with each reward and "
        "measure each one's KL to the reference: exact (full vocabulary at every position) and "
        "the k1/k3 estimates on the sampled tokens. Writes one JSON line per response and "
        "prints the means with standard errors.",
    )
    gen.add_argument("model", metavar="RUN_OR_MODEL", help=model_help)
    gen.add_argument("--prompts", required=True, metavar="SOURCE", help=_PROMPTS_HELP)
    gen.add_argument(
        "--out", default="responses.jsonl", metavar="JSONL", help="default: %(default)s"
    )
    gen.add_argument("--n", type=int, default=1, help="responses per prompt (default: 1)")
    gen.add_argument(
        "--reward",
        action="append",
        metavar="SPEC",
        help="a reward to score with (repeatable): built-in, reward-model dir or "
        "module:function (default: a run's reward and eval_rewards; none: no reward)",
    )
    gen.add_argument("--reference", metavar="MODEL", help=reference_help)
    gen.add_argument("--checkpoint", help=checkpoint_help)
    sampling_flags(gen)
    gen.add_argument("--prompt-field", default="prompt", help="the prompt column of the file")
    gen.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    gen.add_argument("--limit", type=int, help="use only the first LIMIT prompts")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    gen.set_defaults(func=_generate)

    ev = sub.add_parser(
        "eval",
        help="the held-out evaluation (rewards, KL, diversity, capability) of a saved model",
        description="Run the held-out evaluation trainers run every eval_steps on a saved "
        "model: proxy and gold rewards, KL to the reference, entropy, diversity, capability NLL "
        "and its tax, off-task KL. Settings default to the run's config.yaml. Writes the "
        "metrics as JSON and the samples as JSONL, and prints a table.",
    )
    ev.add_argument("model", metavar="RUN_OR_MODEL", help=model_help)
    ev.add_argument(
        "--prompts", metavar="FILE", help="eval prompts (default: the run's held-out prompts)"
    )
    ev.add_argument("--reward", metavar="SPEC", help="the proxy reward (default: the run's)")
    ev.add_argument(
        "--eval-reward",
        action="append",
        metavar="SPEC",
        help="a gold reward (repeatable; default: the run's eval_rewards)",
    )
    ev.add_argument("--reference", metavar="MODEL", help=reference_help)
    ev.add_argument("--checkpoint", help=checkpoint_help)
    ev.add_argument("--samples-per-prompt", type=int, help="completions per prompt (default 4)")
    ev.add_argument(
        "--num-prompts", type=int, help="prompts used (default: all of --prompts, or the run's)"
    )
    ev.add_argument(
        "--capability-text",
        metavar="SPEC",
        help="general text for the capability NLL: general (shipped), a file, or none",
    )
    ev.add_argument(
        "--offtask-prompts", metavar="SPEC", help="off-task prompts: general, a file, or none"
    )
    ev.add_argument(
        "--no-semantic", action="store_true", help="skip the semantic similarity (MiniLM)"
    )
    sampling_flags(ev)
    ev.add_argument("--batch-size", type=int, help="sequences per sampling batch (default 32)")
    ev.add_argument("--seed", type=int, help="sampling seed (default: the run's)")
    ev.add_argument("--out", default="eval.json", metavar="JSON", help="default: %(default)s")
    ev.add_argument(
        "--samples", metavar="JSONL", help="samples file (default: OUT with .samples.jsonl)"
    )
    ev.set_defaults(func=_eval)

    export = sub.add_parser(
        "export",
        help="write a run's model as a plain HF model directory (LoRA merged)",
        description="Write a run's trained model (final/ by default) as a Hugging Face model "
        "directory that transformers loads without peft or tether: safetensors, config, "
        "generation config, tokenizer, and tether_export.json recording where it came from. "
        "A LoRA adapter is merged into its base model.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    export.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/export)")
    export.add_argument("--checkpoint", help=checkpoint_help)
    export.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype (default: %(default)s)",
    )
    export.set_defaults(func=_export)

    control = sub.add_parser(
        "control",
        help="PPO / PPO-penalty / TRPO on gymnasium tasks: tether control ALGO --env ID",
        description="Train ALGO (ppo, ppo_penalty, trpo) on a gymnasium environment, or "
        "`tether control eval RUN_DIR` to run a saved policy. Overrides as for `tether train`.",
    )
    control.add_argument("algo", metavar="ALGO", help="ppo | ppo_penalty | trpo | eval")
    control.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    control.add_argument(
        "--env",
        help="gymnasium environment id (env=ID); the run goes to runs/control/ALGO-ENV unless "
        "output_dir is set",
    )
    control.add_argument("-c", "--config", metavar="YAML", help="a YAML recipe for ALGO's config")
    control.add_argument("--print-config", action="store_true", help="print the config and exit")
    control.add_argument("--help-config", action="store_true", help="list the config fields")
    control.add_argument(
        "--episodes", type=int, default=10, help="eval: episodes (default: %(default)s)"
    )
    control.add_argument("--seed", type=int, default=0, help="eval: first episode's seed")
    control.add_argument(
        "--stochastic", action="store_true", help="eval: sample actions instead of the mode"
    )
    control.set_defaults(func=_control)
    return parser


DEBUG_ENV = "TETHER_DEBUG"
"""Set to 1 (or pass ``--debug``) to see the traceback of an error the CLI would print in a line."""


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` is among the arguments (anywhere) or TETHER_DEBUG is set; the
    arguments without it."""
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    rest = [a for a in argv if a != "--debug"]
    return debug or len(rest) != len(argv), rest


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """tether's own warnings as one ``tether: warning: ...`` line; others as Python shows them."""
    from tether.errors import TetherWarning

    stream = file if file is not None else sys.stderr
    if issubclass(category, TetherWarning):
        stream.write(f"tether: warning: {message}\n")
    else:
        stream.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tether`` command line on ``argv`` (default ``sys.argv[1:]``); return the exit
    status: 0 done, 2 a user error (printed as a few lines naming what, where and what was
    expected; ``--debug`` or TETHER_DEBUG=1 shows the traceback), 130 interrupted."""
    debug, argv = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    # argparse gives a trailing nargs="*" positional only the words before the first option, so
    # `train ALGO a=1 --config r.yaml b=2` leaves b=2 unparsed: collect such words as overrides.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) not in ("train", "control", "lab") or any(
            e.startswith("-") for e in extra
        ):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from tether.errors import TetherError, describe_os_error

    name = f"tether {args.command}"
    previous = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return int(args.func(args))
    except TetherError as exc:
        if debug:
            raise
        print(f"{name}: error: {exc}", file=sys.stderr)
        print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2
    except OSError as exc:
        # A disk-full or permission error that reached the CLI without being re-raised as a
        # tether error where it happened: still one line, as the cause is outside the program.
        if debug:
            raise
        print(f"{name}: error: {describe_os_error(exc, 'while accessing')}", file=sys.stderr)
        print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
