"""A Bradley–Terry reward model on SmolLM2-135M-Instruct that learns VADER's judgement.

    python examples/reward_vader.py                     # ~20 min on 2 CPU cores
    python examples/reward_vader.py --samples 3 --steps 4 --out runs/reward-smoke   # smoke

1. ``--samples`` completions for each of the 210 movie-review prompts from the embedded model
   (chat template, T = 1, bf16 autocast where the CPU has it), scored by VADER.
2. Pairs: every two completions of the same prompt whose VADER scores differ by ≥ ``--gap``,
   higher = chosen. Every fifth prompt is held out, so held-out pairs come from unseen prompts.
3. ``tether train reward`` (full fine-tune of the backbone + scalar head) on the training pairs.
4. Held-out pair accuracy and loss before (step 0) and after, and the rank correlation between
   the trained model's scores and VADER's on the held-out completions.

Writes ``--out``/prefs_{train,eval}.jsonl, the run directory (``run/reward_model`` is the saved
model) and ``results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tether.data import load_prompt_dataset  # noqa: E402
from tether.models import SamplingConfig, generate, load_policy  # noqa: E402
from tether.rewards import make_reward  # noqa: E402
from tether.rewards.model import load_reward_model  # noqa: E402
from tether.runs import read_metrics  # noqa: E402
from tether.train.common import resolve_mixed_precision  # noqa: E402
from tether.train.reward_model import RewardConfig, train  # noqa: E402

PROMPTS = REPO / "data" / "movie_review_prompts.jsonl"


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x: list[float]) -> torch.Tensor:
        t = torch.tensor(x, dtype=torch.float64)
        return t.argsort().argsort().to(torch.float64)  # ties broken by order: fine here

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--gap", type=float, default=0.2)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/reward-vader")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    base = load_policy("smollm2-135m-instruct")
    tok = base.tokenizer
    prompts = list(load_prompt_dataset(str(PROMPTS), tok, as_chat=True))
    raw = [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines() if x.strip()]
    bf16 = resolve_mixed_precision("auto") == "bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    flat = [e.prompt_ids for e in prompts for _ in range(a.samples)]
    texts: list[str] = []
    with autocast:
        for s in range(0, len(flat), 64):
            r = generate(
                base.model,
                tok,
                flat[s : s + 64],
                SamplingConfig(max_new_tokens=a.max_new_tokens),
                generator_seed=a.seed + s,
            )
            texts += [
                tok.decode(r.response_ids[i][r.response_mask[i]], skip_special_tokens=True).strip()
                for i in range(r.response_ids.shape[0])
            ]
    sample_s = time.perf_counter() - t0
    vader = make_reward("vader")
    scores = list(vader(["" for _ in texts], texts))

    rows: dict[str, list[dict]] = {"train": [], "eval": []}
    held: list[tuple[str, str, float]] = []
    for i, prompt in enumerate(raw):
        split = "eval" if i % 5 == 4 else "train"
        cand = [(texts[i * a.samples + j], scores[i * a.samples + j]) for j in range(a.samples)]
        if split == "eval":
            held += [(prompt, t, sc) for t, sc in cand]
        for x in range(len(cand)):
            for y in range(x + 1, len(cand)):
                (tx, sx), (ty, sy) = cand[x], cand[y]
                if abs(sx - sy) < a.gap or not tx or not ty:
                    continue
                hi, lo = ((tx, sx), (ty, sy)) if sx > sy else ((ty, sy), (tx, sx))
                rows[split].append(
                    {
                        "prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": hi[0]}],
                        "rejected": [{"role": "assistant", "content": lo[0]}],
                        "score_chosen": hi[1],
                        "score_rejected": lo[1],
                    }
                )
    random.Random(a.seed).shuffle(rows["train"])
    for split, rs in rows.items():
        (out / f"prefs_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rs))
    print(
        f"{len(texts)} samples in {sample_s:.0f} s; pairs: {len(rows['train'])} train, "
        f"{len(rows['eval'])} eval"
    )

    cfg = RewardConfig(
        model="smollm2-135m-instruct",
        train_data=str(out / "prefs_train.jsonl"),
        eval_data=str(out / "prefs_eval.jsonl"),
        as_chat=True,
        output_dir=str(out / "run"),
        learning_rate=a.lr,
        lr_scheduler="linear",
        warmup_steps=max(a.steps // 10, 1),
        batch_size=a.batch_size,
        max_steps=a.steps,
        eval_steps=max(a.steps // 4, 1),
        logging_steps=max(a.steps // 8, 1),
        save_steps=0,
        normalization_samples=256,
        seed=a.seed,
    )
    t1 = time.perf_counter()
    final = train(cfg)
    train_s = time.perf_counter() - t1
    evals = [r for r in read_metrics(cfg.output_dir) if "eval/accuracy" in r]

    rm = load_reward_model(str(out / "run" / "reward_model"))
    rm_scores = list(rm([h[0] for h in held], [h[1] for h in held]))
    rho = spearman(rm_scores, [h[2] for h in held])
    results = {
        "args": vars(a),
        "pairs": {k: len(v) for k, v in rows.items()},
        "eval_curve": [
            {"step": r["step"], "accuracy": r["eval/accuracy"], "loss": r["eval/loss"]}
            for r in evals
        ],
        "heldout_spearman_rm_vs_vader": rho,
        "heldout_completions": len(held),
        "final": final,
        "timings": {"sample_s": sample_s, "train_s": train_s},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("pairs", "eval_curve")}, indent=1))
    print(f"held-out Spearman(RM, VADER) over {len(held)} completions: {rho:.3f}")


if __name__ == "__main__":
    main()
