"""Real run: offline DPO on SmolLM2-135M-Instruct with VADER sentiment as the judge.

1. Sample ``--samples`` completions per movie-review prompt from the embedded SmolLM2, score them
   with VADER, and keep (best, worst) as a (chosen, rejected) pair when they differ by ≥ 0.1.
   Every fifth prompt is held out: its pairs form the eval set, its prompts the eval prompts.
2. Train offline DPO (``tether.train.dpo``) on the pairs, precomputed reference.
3. Before and after: sample fresh completions for the held-out prompts (same seeds) and report the
   mean VADER score, and for the trained policy the KL to the reference *on its own samples*:
   k1 and k3 sequence sums (unbiased) and the exact per-token KL summed over each response.

    python examples/dpo_vader.py --out runs/dpo-vader            # ≈ 30-45 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from tether.core.kl import exact_from_logits, k1, k3
from tether.core.masked import masked_sum
from tether.data import load_prompt_dataset
from tether.models import SamplingConfig, forward_logprobs, generate, load_policy
from tether.rewards import VaderSentiment
from tether.train.dpo import DPOConfig, train

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "movie_review_prompts.jsonl"


def sample(model, tok, prompt_ids, n, max_new, seed, batch=64):
    """n samples per prompt: returns (texts[p][i], rollouts) in prompt-major order."""
    flat = [p for p in prompt_ids for _ in range(n)]
    texts, rollouts = [], []
    for s in range(0, len(flat), batch):
        r = generate(
            model,
            tok,
            flat[s : s + batch],
            SamplingConfig(max_new_tokens=max_new),
            generator_seed=seed + s,
        )
        rollouts.append(r)
        for i in range(r.response_ids.shape[0]):
            ids = r.response_ids[i][r.response_mask[i]]
            texts.append(tok.decode(ids, skip_special_tokens=True).strip())
    return [texts[i * n : (i + 1) * n] for i in range(len(prompt_ids))], rollouts


@torch.no_grad()
def on_policy_kl(policy_model, ref_model, rollouts):
    """Per-sequence KL(π‖π_ref) on the policy's own samples: k1 sum, k3 sum, exact sum."""
    out = {"k1": [], "k3": [], "exact": []}
    for r in rollouts:
        m = torch.cat(
            [torch.zeros_like(r.attention_mask[:, 1 : r.prompt_length]), r.response_mask], 1
        )
        pol = forward_logprobs(
            policy_model, r.input_ids, r.attention_mask, mask=m, return_logits=True
        )
        ref = forward_logprobs(ref_model, r.input_ids, r.attention_mask, mask=m, return_logits=True)
        out["k1"] += masked_sum(k1(pol.logprobs, ref.logprobs), m, dim=-1).tolist()
        out["k3"] += masked_sum(k3(pol.logprobs, ref.logprobs), m, dim=-1).tolist()
        out["exact"] += exact_from_logits(pol.logits, ref.logits, m).sum(-1).tolist()
    return {k: (sum(v) / len(v), _se(v)) for k, v in out.items()}


def _se(v):
    mu = sum(v) / len(v)
    return math.sqrt(sum((x - mu) ** 2 for x in v) / max(len(v) - 1, 1) / len(v))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="runs/dpo-vader")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--samples", type=int, default=4, help="completions per prompt for pairs")
    ap.add_argument("--eval-samples", type=int, default=4, help="completions per eval prompt")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    vader = VaderSentiment()
    base = load_policy(a.model, dtype="float32")
    tok = base.tokenizer
    prompts = load_prompt_dataset(PROMPTS, tok, as_chat=True)
    eval_idx = [i for i in range(len(prompts)) if i % 5 == 0]
    train_idx = [i for i in range(len(prompts)) if i % 5 != 0]
    timings = {}

    # 1. preference pairs labelled by VADER
    t = time.perf_counter()
    for name, idx in (("train", train_idx), ("eval", eval_idx)):
        pids = [prompts[i].prompt_ids for i in idx]
        texts, _ = sample(base.model, tok, pids, a.samples, a.max_new_tokens, a.seed + 1000)
        rows = []
        for i, group in zip(idx, texts, strict=True):
            scores = vader([prompts[i].prompt] * len(group), group)
            hi, lo = (
                max(range(len(group)), key=scores.__getitem__),
                min(range(len(group)), key=scores.__getitem__),
            )
            if scores[hi] - scores[lo] < 0.1:
                continue
            msgs = prompts[i].messages
            rows.append(
                {
                    "prompt": msgs,
                    "chosen": [{"role": "assistant", "content": group[hi]}],
                    "rejected": [{"role": "assistant", "content": group[lo]}],
                    "score_chosen": scores[hi],
                    "score_rejected": scores[lo],
                }
            )
        (out / f"prefs_{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        print(f"{name}: {len(rows)} pairs from {len(idx)} prompts")
    timings["pairs_s"] = time.perf_counter() - t

    # 2. before: fresh samples on held-out prompts
    eval_pids = [prompts[i].prompt_ids for i in eval_idx]
    eval_prompts = [prompts[i].prompt for i in eval_idx]

    def vader_mean(texts):
        flat = [x for g in texts for x in g]
        s = vader([p for p, g in zip(eval_prompts, texts, strict=True) for _ in g], flat)
        return sum(s) / len(s), _se(s)

    before_texts, _ = sample(base.model, tok, eval_pids, a.eval_samples, a.max_new_tokens, a.seed)
    before = vader_mean(before_texts)

    # 3. offline DPO
    cfg = DPOConfig(
        model=a.model,
        train_data=str(out / "prefs_train.jsonl"),
        eval_data=str(out / "prefs_eval.jsonl"),
        output_dir=str(out / "run"),
        beta=a.beta,
        learning_rate=a.lr,
        max_steps=a.steps,
        batch_size=8,
        gradient_accumulation_steps=1,
        logging_steps=10,
        eval_steps=40,
        save_steps=a.steps,
        warmup_steps=10,
        lr_scheduler="cosine",
        max_length=192,
        max_prompt_length=96,
        seed=a.seed,
        exact_kl_samples=2,
        # held-out sampling at steps 0, 40, 80, 120 (eval/ metrics, samples/, `tether report`):
        # VADER is the proxy the pairs were labelled by, TextBlob and AFINN gold lexicons
        reward="vader",
        max_new_tokens=a.max_new_tokens,
        eval_rewards=["textblob", "afinn"],
    )
    t = time.perf_counter()
    final = train(cfg)
    timings["train_s"] = time.perf_counter() - t

    # 4. after: same prompts, same seeds
    trained = load_policy(out / "run" / "final", dtype="float32")
    after_texts, rollouts = sample(
        trained.model, tok, eval_pids, a.eval_samples, a.max_new_tokens, a.seed
    )
    after = vader_mean(after_texts)
    kl = on_policy_kl(trained.model, base.model, rollouts)

    results = {
        "vader_before": before,
        "vader_after": after,
        "kl_on_policy": kl,
        "eval_accuracy_final": final.get("eval/rewards/accuracy"),
        "eval_loss_final": final.get("eval/loss"),
        "train_metrics_final": final,
        "timings": timings,
        "args": vars(a),
        "samples": [
            {"prompt": eval_prompts[i], "before": before_texts[i][0], "after": after_texts[i][0]}
            for i in random.Random(0).sample(range(len(eval_prompts)), 4)
        ],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        json.dumps(
            {
                k: results[k]
                for k in (
                    "vader_before",
                    "vader_after",
                    "kl_on_policy",
                    "eval_accuracy_final",
                    "timings",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
