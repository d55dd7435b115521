"""Write data/sft_train.jsonl and data/sft_eval.jsonl: short instructions with checkable answers.

    python data/make_sft_data.py          # deterministic: the same files every time

Seven tasks, each answer short and exactly checkable: arithmetic, word reversal, capitalisation,
sorting numbers, antonyms, counting letters, and the sentiment of a short movie review. Rows
alternate between TRL's two instruction formats: prompt/completion strings (train with
``as_chat: true`` so the chat template wraps them) and ``messages`` conversations (a third with
two question/answer turns). Every row also has a ``task`` column (ignored by the loader) and
``answer``: the exact expected reply of the (first) assistant turn. Eval rows use questions that
never occur in the train file.

All text is written from scratch for this project (Apache-2.0, like the project).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240601
N_TRAIN, N_EVAL = 480, 96

WORDS = (
    "garden planet silver window basket candle forest rocket pencil bridge orange ladder "
    "market button dragon guitar island jacket kettle lemon marble needle pillow rabbit saddle "
    "tunnel violin wallet yellow anchor blanket castle dinner engine feather harbor insect "
    "jungle kitten lantern meadow napkin oyster parrot quiver ribbon shadow teapot umbrella "
    "velvet walnut yogurt zipper copper mirror summer winter valley cotton carpet"
).split()

ANTONYMS = (
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("early", "late"),
    ("light", "dark"),
    ("open", "closed"),
    ("full", "empty"),
    ("strong", "weak"),
    ("rich", "poor"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("young", "old"),
    ("wet", "dry"),
    ("high", "low"),
    ("long", "short"),
    ("thick", "thin"),
    ("clean", "dirty"),
    ("brave", "afraid"),
    ("up", "down"),
    ("inside", "outside"),
    ("give", "take"),
    ("win", "lose"),
    ("push", "pull"),
    ("arrive", "leave"),
    ("buy", "sell"),
    ("true", "false"),
    ("first", "last"),
    ("begin", "end"),
    ("above", "below"),
    ("near", "far"),
    ("cheap", "expensive"),
    ("sweet", "sour"),
    ("wide", "narrow"),
    ("heavy", "light"),
    ("smooth", "rough"),
    ("friend", "enemy"),
    ("question", "answer"),
    ("remember", "forget"),
    ("accept", "refuse"),
)

POSITIVE = (
    "the acting was superb",
    "I loved every minute",
    "the story kept me hooked",
    "the music was beautiful",
    "a warm and funny film",
    "the cast shines in every scene",
    "a clever plot with real heart",
    "the best film I have seen this year",
    "the ending made me smile",
    "gorgeous camera work throughout",
)
NEGATIVE = (
    "the acting was wooden",
    "I was bored the whole time",
    "the plot made no sense",
    "the music was grating",
    "a dull and lifeless film",
    "the cast looked lost",
    "a lazy script with no heart",
    "the worst film I have seen this year",
    "the ending was a letdown",
    "ugly, muddy camera work",
)
SUBJECTS = (
    "The new space drama",
    "This comedy",
    "The detective film",
    "The animated feature",
    "This war epic",
    "The romantic comedy",
    "The horror sequel",
    "This courtroom thriller",
    "The family adventure",
    "The documentary",
)

Row = tuple[str, str]  # (question, answer)


def arithmetic(rng: random.Random) -> Row:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    sym = {"+": "+", "-": "-", "*": "×"}[op]
    ask = rng.choice(("What is {}?", "Compute {}.", "Calculate {}. Reply with the number only."))
    return ask.format(f"{a} {sym} {b}"), str(value)


def reverse_word(rng: random.Random) -> Row:
    w = rng.choice(WORDS)
    ask = rng.choice(("Reverse the word '{}'.", "Spell '{}' backwards.", "Write '{}' in reverse."))
    return ask.format(w), w[::-1]


def capitalise(rng: random.Random) -> Row:
    words = rng.sample(WORDS, rng.randint(2, 3))
    text = " ".join(words)
    ask = rng.choice(("Write '{}' in capital letters.", "Convert to uppercase: {}"))
    return ask.format(text), text.upper()


def sort_numbers(rng: random.Random) -> Row:
    nums = rng.sample(range(1, 100), rng.randint(3, 5))
    ask = rng.choice(
        ("Sort these numbers from smallest to largest: {}", "Put in ascending order: {}")
    )
    return ask.format(", ".join(map(str, nums))), ", ".join(map(str, sorted(nums)))


def antonym(rng: random.Random) -> Row:
    a, b = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    ask = rng.choice(("What is the opposite of '{}'?", "Give an antonym of '{}'."))
    return ask.format(a), b


def count_letters(rng: random.Random) -> Row:
    w = rng.choice(WORDS)
    return f"How many letters are in the word '{w}'?", str(len(w))


def sentiment(rng: random.Random) -> Row:
    positive = rng.random() < 0.5
    phrases = rng.sample(POSITIVE if positive else NEGATIVE, 2)
    review = f"{rng.choice(SUBJECTS)}: {phrases[0]}, and {phrases[1]}."
    ask = f'Review: "{review}" Is this movie review positive or negative? Answer with one word.'
    return ask, "positive" if positive else "negative"


TASKS: dict[str, Callable[[random.Random], Row]] = {
    "arithmetic": arithmetic,
    "reverse": reverse_word,
    "uppercase": capitalise,
    "sort": sort_numbers,
    "antonym": antonym,
    "count": count_letters,
    "sentiment": sentiment,
}


def make_rows(n: int, rng: random.Random, avoid: set[str]) -> list[dict]:
    """``n`` rows cycling through the tasks; every question new (not in ``avoid``, which grows)."""
    rows = []
    names = list(TASKS)
    i = 0
    while len(rows) < n:
        task = names[i % len(names)]
        i += 1
        q, a = TASKS[task](rng)
        if q in avoid:
            continue
        avoid.add(q)
        fmt = len(rows) % 3  # 0: prompt/completion; 1: one-turn messages; 2: two-turn messages
        if fmt == 0:
            rows.append({"prompt": q, "completion": a, "task": task, "answer": a})
            continue
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if fmt == 2:
            task2 = names[(i + 3) % len(names)]
            q2, a2 = TASKS[task2](rng)
            if q2 in avoid:
                continue
            avoid.add(q2)
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"messages": messages, "task": task, "answer": a})
    return rows


def main() -> None:
    rng = random.Random(SEED)
    seen: set[str] = set()
    # eval first: its questions are then excluded from train
    eval_rows = make_rows(N_EVAL, rng, seen)
    train_rows = make_rows(N_TRAIN, rng, seen)
    for name, rows in (("sft_train.jsonl", train_rows), ("sft_eval.jsonl", eval_rows)):
        path = HERE / name
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{path}: {len(rows)} rows, {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
