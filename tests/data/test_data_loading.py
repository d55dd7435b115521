"""Rows tokenise to exactly the expected ids: standard, conversational, implicit prompt, as_chat;
EOS handling; length rules; fingerprints; DataLoader batching.

Expected ids are built by hand from the tiny tokenizer's vocabulary (every UTF-8 byte is one
token, through GPT-2's byte-to-unicode map), never by calling the tokenizer's encoder.
"""

from __future__ import annotations

import logging
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from tether.data import (
    DataError,
    PreferenceExample,
    collate_preferences,
    collate_prompts,
    load_preference_dataset,
    load_prompt_dataset,
)
from tether.models.tiny import tiny_tokenizer

TOK = tiny_tokenizer()
IM_START = TOK.convert_tokens_to_ids("<|im_start|>")
EOS = TOK.convert_tokens_to_ids("<|im_end|>")
PAD = TOK.convert_tokens_to_ids("<|pad|>")


def _byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    for n, b in enumerate(shifted):
        chars[b] = chr(256 + n)
    return chars


BYTE_TO_CHAR = _byte_to_char()


def ids(*parts: str | int) -> list[int]:
    """Token ids by hand: ints are special-token ids, strings become one token per UTF-8 byte."""
    out: list[int] = []
    for part in parts:
        if isinstance(part, int):
            out.append(part)
        else:
            out += [TOK.convert_tokens_to_ids(BYTE_TO_CHAR[b]) for b in part.encode()]
    return out


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


CHAT_PROMPT_IDS = ids(IM_START, "user\nHi é", EOS, "\n", IM_START, "assistant\n")


def test_byte_helper_agrees_with_vocab() -> None:
    assert ids("A") == [TOK.get_vocab()["A"]]
    assert ids(" \n") == [TOK.get_vocab()["Ġ"], TOK.get_vocab()["Ċ"]]
    assert len(set(BYTE_TO_CHAR.values())) == 256


def test_standard_pair_ids_and_eos_appended() -> None:
    ds = load_preference_dataset([{"prompt": "2+2=", "chosen": " 4", "rejected": " 5."}], TOK)
    (ex,) = ds
    assert ex == PreferenceExample(
        index=0,
        prompt="2+2=",
        prompt_ids=ids("2+2="),
        chosen_ids=ids(" 4", EOS),
        rejected_ids=ids(" 5.", EOS),
    )
    assert ds.num_truncated == 0


def test_standard_completion_already_ending_with_eos_is_not_doubled() -> None:
    (ex,) = load_preference_dataset(
        [{"prompt": "Q", "chosen": "yes<|im_end|>", "rejected": "no<|im_end|>\n"}], TOK
    )
    assert ex.chosen_ids == ids("yes", EOS)
    assert ex.rejected_ids == ids("no", EOS)  # whitespace after a final EOS is dropped


def test_conversational_pair_ids() -> None:
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, user("Hi é")],
        "chosen": [assistant("Hello!")],
        "rejected": [assistant("Go away")],
    }
    (ex,) = load_preference_dataset([row], TOK)
    system = ids(IM_START, "system\nBe brief.", EOS, "\n")
    assert ex.prompt_ids == system + CHAT_PROMPT_IDS
    assert ex.prompt == "<|im_start|>system\nBe brief.<|im_end|>\n" + (
        "<|im_start|>user\nHi é<|im_end|>\n<|im_start|>assistant\n"
    )
    # the template writes "<|im_end|>\n"; the response ends at EOS, which is not doubled
    assert ex.chosen_ids == ids("Hello!", EOS)
    assert ex.rejected_ids == ids("Go away", EOS)


def test_conversational_multi_message_completion() -> None:
    row = {
        "prompt": [user("Hi é")],
        "chosen": [assistant("a"), user("b"), assistant("c")],
        "rejected": [assistant("d")],
    }
    (ex,) = load_preference_dataset([row], TOK)
    assert ex.chosen_ids == ids("a", EOS, "\n", IM_START, "user\nb", EOS, "\n") + ids(
        IM_START, "assistant\nc", EOS
    )


def test_implicit_prompt_is_the_shared_start() -> None:
    row = {
        "chosen": [user("Hi é"), assistant("Hello!")],
        "rejected": [user("Hi é"), assistant("Go away")],
    }
    (implicit,) = load_preference_dataset([row], TOK)
    (explicit,) = load_preference_dataset(
        [
            {
                "prompt": [user("Hi é")],
                "chosen": [assistant("Hello!")],
                "rejected": [assistant("Go away")],
            }
        ],
        TOK,
    )
    assert implicit == explicit
    assert implicit.prompt_ids == CHAT_PROMPT_IDS
    assert implicit.chosen_ids == ids("Hello!", EOS)


def test_implicit_prompt_spans_several_shared_messages() -> None:
    shared = [user("a"), assistant("b"), user("c")]
    row = {"chosen": [*shared, assistant("yes")], "rejected": [*shared, assistant("no")]}
    (ex,) = load_preference_dataset([row], TOK)
    assert ex.prompt_ids == ids(
        IM_START, "user\na", EOS, "\n", IM_START, "assistant\nb", EOS, "\n"
    ) + ids(IM_START, "user\nc", EOS, "\n", IM_START, "assistant\n")
    assert ex.rejected_ids == ids("no", EOS)


def test_as_chat_wraps_strings_as_messages() -> None:
    (ex,) = load_preference_dataset(
        [{"prompt": "Hi é", "chosen": "Hello!", "rejected": "Go away"}], TOK, as_chat=True
    )
    assert ex.prompt_ids == CHAT_PROMPT_IDS
    assert ex.chosen_ids == ids("Hello!", EOS)
    (p,) = load_prompt_dataset([{"prompt": "Hi é"}], TOK, as_chat=True)
    assert p.prompt_ids == CHAT_PROMPT_IDS
    assert p.messages == [user("Hi é")]


def test_prompt_dataset_standard_and_conversational() -> None:
    ds = load_prompt_dataset(
        [{"prompt": "Once upon"}, {"prompt": [user("Hi é")]}, {"prompt": "a time"}], TOK
    )
    assert [ex.index for ex in ds] == [0, 1, 2]
    assert ds[0].prompt_ids == ids("Once upon")
    assert ds[0].messages is None
    assert ds[1].prompt_ids == CHAT_PROMPT_IDS
    assert ds[1].messages == [user("Hi é")]
    assert ds[1].prompt == "<|im_start|>user\nHi é<|im_end|>\n<|im_start|>assistant\n"


def test_prompt_field_is_configurable() -> None:
    (ex,) = load_prompt_dataset(
        [{"question": "Why?", "answer": "42"}], TOK, prompt_field="question"
    )
    assert ex.prompt_ids == ids("Why?")


def test_none_valued_message_keys_are_dropped() -> None:
    """Arrow-backed sources write None for keys only some messages have."""
    (ex,) = load_prompt_dataset([{"prompt": [{**user("Hi é"), "name": None}]}], TOK)
    assert ex.messages == [user("Hi é")]
    assert ex.prompt_ids == CHAT_PROMPT_IDS


def test_response_truncated_from_the_end_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        {"prompt": "abc", "chosen": "defgh", "rejected": "x"},  # chosen: 6 ids > 7 - 3
        {"prompt": "ab", "chosen": "cd", "rejected": "e"},  # fits: 2 + 3 ≤ 7
        {"prompt": "abcdef", "chosen": "g", "rejected": "h"},  # exactly 6 + 2 > 7 → both cut
    ]
    with caplog.at_level(logging.WARNING, logger="tether.data.loading"):
        ds = load_preference_dataset(rows, TOK, max_length=7)
    assert ds.num_truncated == 2
    assert ds[0].chosen_ids == ids("defg")  # prompt kept whole, response loses its end and EOS
    assert ds[0].rejected_ids == ids("x", EOS)
    assert ds[0].prompt_ids == ids("abc")
    assert ds[1].chosen_ids == ids("cd", EOS)
    assert ds[2].chosen_ids == ids("g")
    assert ds[2].rejected_ids == ids("h")
    assert "2 of 3 rows had a response truncated to max_length=7" in caplog.text
    assert "<list>" in caplog.text


def test_identical_pairs_warn_but_load(caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    with caplog.at_level(logging.WARNING, logger="tether.data.loading"):
        ds = load_preference_dataset(rows, TOK)
    assert len(ds) == 2
    assert "1 rows have identical chosen and rejected token ids" in caplog.text
    assert "rows 0" in caplog.text


def test_fingerprint_stable_and_sensitive() -> None:
    rows = [
        {"prompt": "a", "chosen": "b", "rejected": "c"},
        {"prompt": "d", "chosen": "e", "rejected": "f"},
    ]
    first = load_preference_dataset(rows, TOK).fingerprint()
    assert first == load_preference_dataset([dict(r) for r in rows], TOK).fingerprint()
    assert len(first) == 64 and int(first, 16) >= 0
    changed = [rows[0], {**rows[1], "rejected": "g"}]
    assert load_preference_dataset(changed, TOK).fingerprint() != first
    swapped = [rows[1], rows[0]]
    assert load_preference_dataset(swapped, TOK).fingerprint() != first
    truncated = load_preference_dataset(rows, TOK, max_length=2).fingerprint()
    assert truncated != first
    prompts = load_prompt_dataset([{"prompt": "a"}], TOK)
    assert prompts.fingerprint() == load_prompt_dataset([{"prompt": "a"}], TOK).fingerprint()
    assert prompts.fingerprint() != load_prompt_dataset([{"prompt": "b"}], TOK).fingerprint()


def test_dataloader_batches_both_kinds() -> None:
    prefs = load_preference_dataset(
        [{"prompt": "p" * (i + 1), "chosen": "c", "rejected": "rr"} for i in range(5)], TOK
    )
    loader = DataLoader(prefs, batch_size=2, collate_fn=partial(collate_preferences, pad_id=PAD))
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    assert batches[0]["input_ids"].shape == (4, 2 + 3)  # longest: "pp" + "rr" + EOS
    prompts = load_prompt_dataset([{"prompt": "ab"}, {"prompt": "c"}], TOK)
    (batch,) = DataLoader(prompts, batch_size=2, collate_fn=partial(collate_prompts, pad_id=PAD))
    assert batch["input_ids"].tolist() == [ids("ab"), [PAD, *ids("c")]]
    assert batch["attention_mask"].dtype == torch.bool


def test_dataset_is_an_immutable_sequence() -> None:
    ds = load_prompt_dataset([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}], TOK)
    assert len(ds) == 3
    assert [ex.prompt for ex in ds[1:]] == ["b", "c"]
    assert ds[-1].index == 2
    assert "3 examples" in repr(ds)
    with pytest.raises(IndexError):
        ds[3]


def test_prompt_too_long_is_an_error_not_a_cut() -> None:
    with pytest.raises(
        DataError,
        match=r"row 1, field 'prompt': expected at most max_prompt_length=3 tokens, got 4",
    ):
        load_prompt_dataset([{"prompt": "abc"}, {"prompt": "abcd"}], TOK, max_prompt_length=3)
    with pytest.raises(DataError, match=r"row 0, field 'prompt': expected fewer than max_length=4"):
        load_preference_dataset(
            [{"prompt": "abcd", "chosen": "x", "rejected": "y"}], TOK, max_length=4
        )
    with pytest.raises(DataError, match=r"max_prompt_length=2 tokens, got 3"):
        load_preference_dataset(
            [{"prompt": "abc", "chosen": "x", "rejected": "y"}], TOK, max_prompt_length=2
        )


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_limits_must_be_positive_ints(bad: object) -> None:
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        load_preference_dataset(
            [{"prompt": "a", "chosen": "b", "rejected": "c"}], TOK, max_length=bad
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_prompt_length must be a positive int"):
        load_prompt_dataset([{"prompt": "a"}], TOK, max_prompt_length=bad)  # type: ignore[arg-type]
