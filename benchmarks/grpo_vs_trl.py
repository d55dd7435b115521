"""GRPO, tether vs TRL's ``GRPOTrainer``: seconds per step and peak RSS.

Same model (SmolLM2-135M-Instruct from tether's local checkpoint; no hub), same prompts (the
movie-review prompts, plain strings, fed in the same order), same reward (VADER compound sentiment
of the completion), same G (``--num-generations``), prompts per step, max new tokens, sampling
temperature (1.0, no top-k/top-p), β (KL to the reference in the loss, k3), learning rate, one
policy update per generation (μ = 1), the GRPO loss normalisation (per-sequence token mean, then
the batch mean: TRL ``loss_type="grpo"``, tether ``loss_aggregation="seq_mean"``) and group-std
reward scaling. Each configuration runs in a fresh subprocess, so its peak RSS is its own.

    python benchmarks/grpo_vs_trl.py                          # 10 steps, 4 prompts × 4, 32 tokens
    python benchmarks/grpo_vs_trl.py --steps 2 --max-new-tokens 8   # smoke

Rows: ``tether`` (defaults: bf16 autocast where the hardware has it, selective activation
checkpointing, packing, fused head), ``tether-fp32`` (``mixed_precision="no"``),
``trl-default`` (GRPOConfig's defaults on this hardware: bf16 with ``use_cpu=True``, gradient
checkpointing) and ``trl-fp32`` (fp32, no checkpointing). s/step is the median time between
optimizer steps after ``--warmup`` steps; one step = generate G completions for each prompt,
score, reference log-probs, update. Sampling is random, so the two libraries' completions (and
their lengths, which set the cost) differ: the mean completion length of each run is printed next
to its time.

The last line, for the defaults pair, is
``speedup: <X>x steps/s vs TRL, peak RSS ratio <Y>``; the line before gives the matched fp32 pair.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import _now, _peak_rss_mib, _step_times

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "data" / "movie_review_prompts.jsonl"
MODEL = "smollm2-135m-instruct"
STAGES = ("gen_s", "reward_s", "ref_s", "kl_fp32_s", "exact_kl_s", "update_s", "s_per_step")
"""The per-stage seconds tether's RL loop logs (``tether.train.rl``), printed per tether row."""

CONFIGS: dict[str, dict] = {
    "tether": {"lib": "tether", "mixed_precision": "auto"},
    "tether-fp32": {"lib": "tether", "mixed_precision": "no"},
    "trl-default": {"lib": "trl", "bf16": True, "grad_ckpt": True},
    "trl-fp32": {"lib": "trl", "bf16": False, "grad_ckpt": False},
}
DEFAULTS = ("tether", "trl-default")
MATCHED = ("tether-fp32", "trl-fp32")


def prompt_order(n_prompts: int, a: dict) -> list[int]:
    """The prompts in the order tether's DataCursor draws them (epoch 0, then 1, …)."""
    import torch

    order: list[int] = []
    epoch = 0
    while len(order) < a["steps"] * a["batch_size"]:
        g = torch.Generator().manual_seed(a["seed"] + epoch)  # DataCursor: seed + epoch
        order += torch.randperm(n_prompts, generator=g).tolist()
        epoch += 1
    return order


def _prompts() -> list[str]:
    return [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines() if x.strip()]


def child_tether(spec: dict, a: dict, t_start: float) -> dict:
    import torch

    import tether.train.common as common_mod
    from tether.runs import read_metrics
    from tether.train.common import resolve_mixed_precision
    from tether.train.grpo import GRPOConfig, train

    marks: list[tuple[float, float]] = []
    make_optimizer = common_mod.make_optimizer  # called by tether.train.common.prepare_training

    def marked_optimizer(*args, **kwargs):
        optimizer = make_optimizer(*args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: marks.append(_now()))
        marks.append(_now())  # the loop starts right after setup
        return optimizer

    common_mod.make_optimizer = marked_optimizer
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "prompts.jsonl"
        data.write_text("\n".join(json.dumps({"prompt": p}) for p in _prompts()))
        cfg = GRPOConfig(
            model=a["model"],
            prompts=str(data),
            reward="vader",
            output_dir=str(Path(tmp) / "run"),
            seed=a["seed"],
            max_steps=a["steps"],
            logging_steps=1,
            save_steps=0,
            batch_size=a["batch_size"],
            num_generations=a["num_generations"],
            max_new_tokens=a["max_new_tokens"],
            kl_coef=a["beta"],
            learning_rate=a["lr"],
            lr_scheduler="linear",
            exact_kl_samples=0,
            dtype="float32",
            mixed_precision=spec["mixed_precision"],
        )
        t0 = time.perf_counter()
        train(cfg)
        train_s = time.perf_counter() - t0
        rows = [r for r in read_metrics(cfg.output_dir) if "score" in r]
    return {
        "settings": {
            "mixed_precision": resolve_mixed_precision(cfg.mixed_precision),
            "activation_checkpointing": cfg.activation_checkpointing,
            "kl": f"{cfg.kl_estimator} in the {cfg.kl_in}, beta {cfg.kl_coef}",
            "loss_aggregation": cfg.loss_aggregation,
            "torch_threads": torch.get_num_threads(),
        },
        **_step_times(marks),
        "mean_completion_tokens": statistics.mean(r["response_length"] for r in rows),
        "mean_score": statistics.mean(r["score"] for r in rows),
        "setup_s": marks[0][0] - t_start,
        "train_call_s": train_s,
        # where a step's time went: the run's own per-stage seconds, median over the steps
        "breakdown_s": {
            stage: statistics.median(r[stage] for r in rows)
            for stage in STAGES
            if all(stage in r for r in rows)
        },
    }


def child_trl(spec: dict, a: dict, t_start: float) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tether.rewards import make_reward

    vader = make_reward("vader")

    def vader_reward(prompts, completions, **kwargs):
        return list(vader(list(prompts), list(completions)))

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, float]] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [_now()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(_now())

    prompts = _prompts()
    order = prompt_order(len(prompts), a)
    dataset = Dataset.from_list([{"prompt": prompts[i]} for i in order])
    timer = StepTimer()
    n = a["batch_size"] * a["num_generations"]
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp,
            seed=a["seed"],
            max_steps=a["steps"],
            per_device_train_batch_size=n,
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_iterations=1,
            num_generations=a["num_generations"],
            max_completion_length=a["max_new_tokens"],
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=a["beta"],
            learning_rate=a["lr"],
            loss_type="grpo",
            scale_rewards="group",
            shuffle_dataset=False,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=spec["bf16"],
            gradient_checkpointing=spec["grad_ckpt"],
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        tok = AutoTokenizer.from_pretrained(a["model"])
        trainer = GRPOTrainer(
            model=a["model"],
            reward_funcs=[vader_reward],
            args=args,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=[timer],
        )
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "settings": {
            "bf16_autocast": args.bf16,
            "gradient_checkpointing": args.gradient_checkpointing,
            "loss_type": args.loss_type,
            "reference": "live copy" if a["beta"] > 0 else "none",
            "torch_threads": torch.get_num_threads(),
        },
        **_step_times(timer.marks),
        "mean_completion_tokens": statistics.mean(
            h.get("completions/mean_length", math.nan) for h in logs
        ),
        "mean_score": statistics.mean(h["reward"] for h in logs),
        "setup_s": timer.marks[0][0] - t_start,
        "train_call_s": train_s,
    }


def run_child(argv: list[str]) -> None:
    t_start = time.perf_counter()
    name, a, result_path = argv[0], json.loads(argv[1]), argv[2]
    if a["threads"]:
        import torch

        torch.set_num_threads(a["threads"])
    spec = CONFIGS[name]
    out = (child_tether if spec["lib"] == "tether" else child_trl)(spec, a, t_start)
    out["peak_rss_mib"] = _peak_rss_mib()
    Path(result_path).write_text(json.dumps(out))


def spawn(name: str, a: dict, work: Path) -> dict:
    result, log = work / f"{name}.json", work / f"{name}.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **({"OMP_NUM_THREADS": str(a["threads"])} if a["threads"] else {}),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, json.dumps(a)]
    print(f"[{name}] running ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([*cmd, str(result)], stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        print(f"[{name}] FAILED (exit {proc.returncode}); last lines of {log}:\n{tail}", flush=True)
        return {"error": f"exit {proc.returncode}", "end_to_end_s": wall}
    out = json.loads(result.read_text())
    out["end_to_end_s"] = wall
    print(f"[{name}] done in {wall:.1f} s", file=sys.stderr, flush=True)
    return out


def pair_line(results: dict, tether: str, trl: str) -> str:
    t, o = results.get(tether, {}), results.get(trl, {})
    if "s_per_step" not in t or "s_per_step" not in o:
        return "n/a (a run is missing or failed)"
    x = o["s_per_step"] / t["s_per_step"]
    y = t["peak_rss_mib"] / o["peak_rss_mib"]
    return f"{x:.2f}x steps/s vs TRL, peak RSS ratio {y:.2f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    p.add_argument("--num-generations", type=int, default=4, help="G")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
    p.add_argument("--only", choices=["tether", "trl"])
    p.add_argument(
        "--configs", help=f"comma-separated rows to run (default: all of {', '.join(CONFIGS)})"
    )
    p.add_argument("--out", help="write all results as JSON here")
    p.add_argument(
        "--model", help="a local HF model directory (default: the embedded SmolLM2-135M-Instruct)"
    )
    args = p.parse_args()
    if min(args.steps, args.batch_size, args.max_new_tokens) < 1 or args.num_generations < 2:
        p.error("need --steps, --batch-size, --max-new-tokens ≥ 1 and --num-generations ≥ 2")
    sys.path.insert(0, str(REPO))
    from tether.models import embedded_model_path

    a = {
        "model": args.model or str(embedded_model_path(MODEL)),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "num_generations": args.num_generations,
        "max_new_tokens": args.max_new_tokens,
        "beta": args.beta,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
    }
    configs = {k: v for k, v in CONFIGS.items() if not args.only or v["lib"] == args.only}
    if args.configs:
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
        unknown = [c for c in names if c not in CONFIGS]
        if unknown:
            p.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
        configs = {k: v for k, v in configs.items() if k in names}
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl-") as tmp:
        results = {name: spawn(name, a, Path(tmp)) for name in configs}
    for r in results.values():
        steps = r.get("step_s") or []
        if steps:
            skip = min(args.warmup, len(steps) - 1)
            r["s_per_step"] = statistics.median(steps[skip:])
    print()
    print(
        f"GRPO, {MODEL}, {args.batch_size} prompts × G={args.num_generations}, "
        f"{args.max_new_tokens} new tokens, β={args.beta}, lr={args.lr:g}, {args.steps} steps, "
        f"median over steps > {args.warmup}"
    )
    header = (
        f"{'configuration':<14}{'s/step':>9}{'peak RSS MiB':>14}{'completion tok':>16}"
        f"{'mean VADER':>12}{'setup s':>9}{'end-to-end s':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<14}FAILED: {r['error']}")
            continue
        print(
            f"{name:<14}{r.get('s_per_step', math.nan):>9.3f}{r['peak_rss_mib']:>14.0f}"
            f"{r['mean_completion_tokens']:>16.1f}{r['mean_score']:>12.3f}"
            f"{r['setup_s']:>9.1f}{r['end_to_end_s']:>14.1f}"
        )
    for name, r in results.items():
        if "settings" in r:
            print(f"  {name}: {json.dumps(r['settings'])}")
    for name, r in results.items():
        if r.get("breakdown_s"):
            parts = ", ".join(f"{k} {v:.2f}" for k, v in r["breakdown_s"].items())
            print(f"  {name} step breakdown, s (median): {parts}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}))
    print(f"tether/TRL, matched fp32 ({' vs '.join(MATCHED)}): {pair_line(results, *MATCHED)}")
    print(f"speedup: {pair_line(results, *DEFAULTS)}")


if __name__ == "__main__":
    main()
