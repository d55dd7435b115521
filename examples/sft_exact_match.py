"""Exact-match accuracy of a model's greedy answers on data/sft_eval.jsonl (the SFT quickstart's
held-out rows), per task: the question is each row's first user turn (or its prompt), wrapped in
the chat template; the answer matches when it equals the row's ``answer`` up to case, surrounding
spaces and a final full stop.

    python examples/sft_exact_match.py smollm2-135m-instruct        # the base model
    python examples/sft_exact_match.py runs/sft/final               # after tether train sft
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tether.models import load_policy

EVAL = Path(__file__).resolve().parents[1] / "data" / "sft_eval.jsonl"


def normalise(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def question(row: dict) -> str:
    return row["prompt"] if "prompt" in row else row["messages"][0]["content"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="embedded name, model directory or run's final/")
    parser.add_argument("--data", default=str(EVAL))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with open(args.data, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh][: args.limit]
    policy = load_policy(args.model, dtype="float32")
    tok, model = policy.tokenizer, policy.model.eval()
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": question(r)}], tokenize=False, add_generation_prompt=True
        )
        for r in rows
    ]
    per_task: dict[str, list[bool]] = {}
    for start in range(0, len(texts), args.batch_size):
        enc = tok(
            texts[start : start + args.batch_size],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id
            )
        answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for row, answer in zip(rows[start : start + args.batch_size], answers, strict=True):
            hit = normalise(answer) == normalise(row["answer"])
            per_task.setdefault(row["task"], []).append(hit)
    hits = sum(sum(v) for v in per_task.values())
    print(" ".join(f"{task} {sum(v)}/{len(v)}" for task, v in sorted(per_task.items())))
    print(f"exact match {args.model}: {hits}/{len(rows)} = {hits / len(rows):.3f}")


if __name__ == "__main__":
    main()
