"""PPO with an adaptive KL penalty on SmolLM2-135M-Instruct, VADER sentiment as the reward.

    python examples/ppo_vader.py                       # both runs, ~30 min on 2 CPU cores
    python examples/ppo_vader.py --steps 4 --batch-size 4 --out runs/ppo-smoke   # a smoke run

Two runs from the same start, same prompts and seed:

* ``adaptive``: PPO (clip 0.2, value head, GAE) with the reference KL shaped into the token
  rewards (k1) and β from the adaptive controller (Ziegler et al. 2019) holding ``--kl-target``
  nats per response;
* ``beta0``: the same with β = 0, no KL penalty at all.

Both runs evaluate 16 held-out prompts (4 samples each) at step 0 and every ``--eval-steps``:
VADER (the proxy), TextBlob and AFINN (gold lexicons, never optimised), KL, diversity, and the
capability NLL on tether's general-text corpus (``eval/`` metrics, ``samples/``); ``tether report
runs/ppo-vader/adaptive runs/ppo-vader/beta0`` draws them.

Written to ``--out``: each run's directory (metrics.jsonl, TensorBoard, final model), and
``results.json`` with the per-iteration score / KL / β curves, and completions of a few held-out
prompts sampled (seeded) from the base model and from each trained one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tether.data import load_prompt_dataset  # noqa: E402
from tether.models import SamplingConfig, generate, load_policy  # noqa: E402
from tether.rewards import make_reward  # noqa: E402
from tether.runs import read_metrics  # noqa: E402
from tether.train.ppo import PPOConfig, train  # noqa: E402

PROMPTS = REPO / "data" / "movie_review_prompts.jsonl"
SHOW = 6  # held-out prompts whose completions go into results.json


def config(a: argparse.Namespace, name: str, beta: float, adaptive: bool) -> PPOConfig:
    return PPOConfig(
        model="smollm2-135m-instruct",
        prompts=str(PROMPTS),
        as_chat=True,
        reward="vader",
        output_dir=str(Path(a.out) / name),
        max_new_tokens=a.max_new_tokens,
        batch_size=a.batch_size,
        num_generations=1,
        ppo_epochs=2,
        num_mini_batches=2,
        learning_rate=a.lr,
        lr_scheduler="constant",
        kl_in="reward",
        kl_estimator="k1",
        kl_coef=beta,
        kl_controller="adaptive" if adaptive else "fixed",
        kl_target=a.kl_target,
        kl_horizon=a.kl_horizon,
        max_steps=a.steps,
        logging_steps=1,
        save_steps=max(a.steps // 2, 1),
        exact_kl_samples=2,
        seed=a.seed,
        # held-out evaluation: 16 prompts held out of training, 4 samples each, at step 0 and
        # every --eval-steps; VADER is the proxy, TextBlob and AFINN the gold lexicons
        eval_steps=a.eval_steps,
        eval_num_prompts=16,
        eval_samples_per_prompt=4,
        eval_rewards=["textblob", "afinn"],
    )


@torch.no_grad()
def sample(model_path: str, prompt_ids: list[list[int]], a: argparse.Namespace) -> list[str]:
    pol = load_policy(model_path)
    out = generate(
        pol.model,
        pol.tokenizer,
        prompt_ids,
        SamplingConfig(max_new_tokens=a.max_new_tokens),
        generator_seed=a.seed + 7,
    )
    return [
        pol.tokenizer.decode(out.response_ids[i][out.response_mask[i]], skip_special_tokens=True)
        for i in range(len(prompt_ids))
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1, help="initial β of the adaptive run")
    p.add_argument("--kl-target", type=float, default=3.0, help="nats per response")
    p.add_argument("--kl-horizon", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-steps", type=int, default=10, help="held-out evaluation every N")
    p.add_argument("--only", choices=["adaptive", "beta0"])
    p.add_argument("--out", default="runs/ppo-vader")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    runs = {"adaptive": (a.beta, True), "beta0": (0.0, False)}
    if a.only:
        runs = {a.only: runs[a.only]}
    results: dict = {"args": vars(a), "runs": {}}
    for name, (beta, adaptive) in runs.items():
        cfg = config(a, name, beta, adaptive)
        final = train(cfg)
        rows = [r for r in read_metrics(cfg.output_dir) if "score" in r]
        evals = [r for r in read_metrics(cfg.output_dir) if "eval/kl/exact" in r]
        results["runs"][name] = {
            "final": final,
            "eval": evals,
            "curves": {
                k: [r.get(k) for r in rows]
                for k in ("score", "kl/k1", "kl/k3", "kl/exact", "beta", "entropy", "s_per_step")
            },
        }
        print(
            f"{name}: score {rows[0]['score']:.3f} -> {rows[-1]['score']:.3f}, "
            f"KL k1 {rows[0]['kl/k1']:.2f} -> {rows[-1]['kl/k1']:.2f}, beta {rows[-1]['beta']:.4f}"
        )
        for key in sorted(evals[0]):
            if key.startswith("eval/"):
                print(f"  {key}: {evals[0][key]:.4g} -> {evals[-1][key]:.4g}")

    base = load_policy("smollm2-135m-instruct")
    data = list(load_prompt_dataset(str(PROMPTS), base.tokenizer, as_chat=True))
    shown = data[-SHOW:]  # the last prompts: seen by training only if it ran past one epoch
    ids = [e.prompt_ids for e in shown]
    vader = make_reward("vader")
    samples = {"base": sample("smollm2-135m-instruct", ids, a)}
    for name in results["runs"]:
        samples[name] = sample(str(out / name / "final"), ids, a)
    results["samples"] = {
        name: [
            {"prompt": e.prompt, "completion": c, "vader": v}
            for e, c, v in zip(shown, texts, vader([e.prompt for e in shown], texts), strict=True)
        ]
        for name, texts in samples.items()
    }
    path = out / ("results.json" if not a.only else f"results-{a.only}.json")
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
