"""Every kind of bad row raises one DataError naming the file, the row (and JSONL line), the field,
and what was expected versus got."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tether.data import DataError, load_preference_dataset, load_prompt_dataset
from tether.data.errors import MAX_LISTED_PROBLEMS
from tether.models.tiny import tiny_tokenizer

TOK = tiny_tokenizer()

GOOD_PAIR = {"prompt": "p", "chosen": "c", "rejected": "r"}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# (bad row, field the error must name, what the message must say about it)
BAD_PAIRS: dict[str, tuple[dict[str, Any], str, str]] = {
    "missing chosen": (
        {"prompt": "p", "rejected": "r"},
        "chosen",
        "missing; the row has fields ['prompt', 'rejected']",
    ),
    "empty prompt": ({**GOOD_PAIR, "prompt": ""}, "prompt", "got an empty string"),
    "int chosen": ({**GOOD_PAIR, "chosen": 3}, "chosen", "expected a non-empty string"),
    "null rejected": ({**GOOD_PAIR, "rejected": None}, "rejected", "got None"),
    "dict prompt": (
        {**GOOD_PAIR, "prompt": {"text": "p"}},
        "prompt",
        "expected a non-empty string or a list of {'role', 'content'} messages, got a dict",
    ),
    "message without role": (
        {"prompt": [{"content": "hi"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        "prompt[0].role",
        "missing; the message has keys ['content']",
    ),
    "message without content": (
        {"prompt": [user("hi")], "chosen": [{"role": "assistant"}], "rejected": [assistant("b")]},
        "chosen[0].content",
        "missing",
    ),
    "unknown role": (
        {
            "prompt": [{"role": "bot", "content": "hi"}],
            "chosen": [assistant("a")],
            "rejected": [assistant("b")],
        },
        "prompt[0].role",
        "expected one of ('system', 'user', 'assistant', 'tool'), got str 'bot'",
    ),
    "content not a string": (
        {"prompt": [user(["hi"])], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        "prompt[0].content",
        "expected a non-empty string, got a list of 1 item",
    ),
    "empty content": (
        {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("")]},
        "rejected[0].content",
        "expected a non-empty string, got an empty string",
    ),
    "message not a dict": (
        {"prompt": [user("hi"), "again"], "chosen": [assistant("a")], "rejected": [assistant("b")]},
        "prompt[1]",
        "expected a dict with 'role' and 'content', got str 'again'",
    ),
    "empty message list": (
        {"prompt": [user("hi")], "chosen": [], "rejected": [assistant("b")]},
        "chosen",
        "expected a non-empty list of messages, got an empty list",
    ),
    "string response to a conversation": (
        {"prompt": [user("hi")], "chosen": "a", "rejected": [assistant("b")]},
        "chosen",
        "expected a list of {'role', 'content'} messages, like the prompt",
    ),
    "conversation response to a string": (
        {"prompt": "hi", "chosen": "a", "rejected": [assistant("b")]},
        "rejected",
        "expected a non-empty string, like the prompt, got a list of 1 item",
    ),
    "implicit prompt from strings": (
        {"chosen": "a", "rejected": "b"},
        "prompt",
        "missing; an implicit prompt can only be split off conversations",
    ),
    "implicit prompt with nothing shared": (
        {"chosen": [user("x"), assistant("a")], "rejected": [user("y"), assistant("b")]},
        "prompt",
        "chosen and rejected differ from their first message",
    ),
    "implicit prompt leaving no response": (
        {"chosen": [user("x")], "rejected": [user("x"), assistant("b")]},
        "chosen",
        "expected messages after the implicit prompt (the first 1 messages",
    ),
    "identical conversations": (
        {"chosen": [user("x"), assistant("a")], "rejected": [user("x"), assistant("a")]},
        "rejected",
        "expected messages after the implicit prompt (the first 2 messages",
    ),
    "prompt ending with EOS": (
        {**GOOD_PAIR, "prompt": "p<|im_end|>"},
        "prompt",
        "ends with the EOS token '<|im_end|>'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_bad_preference_row(case: str, tmp_path: Path) -> None:
    bad, field, says = BAD_PAIRS[case]
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_PAIR, bad, GOOD_PAIR])
    with pytest.raises(DataError) as err:
        load_preference_dataset(path, TOK)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert msg.startswith(f"{path}: ")
    assert f"row 1 (line 2), field '{field}': " in msg
    assert says in msg
    assert {p.row for p in err.value.problems} == {1}
    # the same row from a list names "<list>" and the row, without a line
    with pytest.raises(DataError) as err:
        load_preference_dataset([GOOD_PAIR, bad], TOK)
    assert str(err.value).startswith("<list>: ")
    assert f"row 1, field '{field}': " in str(err.value)


BAD_PROMPTS: dict[str, tuple[dict[str, Any], str, str]] = {
    "missing": ({"text": "hi"}, "prompt", "missing; the row has fields ['text']"),
    "empty": ({"prompt": ""}, "prompt", "got an empty string"),
    "number": ({"prompt": 7}, "prompt", "got int 7"),
    "empty conversation": ({"prompt": []}, "prompt", "got an empty list"),
    "bad role": (
        {"prompt": [{"role": "narrator", "content": "x"}]},
        "prompt[0].role",
        "'narrator'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompt_row(case: str, tmp_path: Path) -> None:
    bad, field, says = BAD_PROMPTS[case]
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, {"prompt": "ok"}, bad])
    with pytest.raises(DataError) as err:
        load_prompt_dataset(path, TOK)
    msg = str(err.value)
    assert msg.startswith(f"{path}: 1 problem in the data\n")
    assert f"row 2 (line 3), field '{field}': " in msg
    assert says in msg


def test_custom_prompt_field_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a"}, {"prompt": "b"}])
    with pytest.raises(DataError, match=r"row 1 \(line 2\), field 'question': missing"):
        load_prompt_dataset(path, TOK, prompt_field="question")


def test_csv_and_dataset_errors_name_source_row_and_field(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\np,c,r\np,,r\n")
    with pytest.raises(DataError, match=r"(?s)pairs\.csv: .*row 1, field 'chosen': .*empty string"):
        load_preference_dataset(path, TOK)
    ds = datasets.Dataset.from_list([{"prompt": "p"}, {"prompt": ""}])
    with pytest.raises(DataError, match=r"(?s)<Dataset>: .*row 1, field 'prompt': .*empty string"):
        load_prompt_dataset(ds, TOK)


def test_all_problems_in_one_error_capped_at_the_listing_limit(tmp_path: Path) -> None:
    rows = [{"prompt": "", "chosen": 1, "rejected": "r"} for _ in range(15)]  # 2 problems a row
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_preference_dataset(path, TOK)
    assert len(err.value.problems) == 30
    assert err.value.source == str(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: 30 problems in the data"
    assert len(lines) == 1 + MAX_LISTED_PROBLEMS + 1
    assert lines[1].startswith("  row 0 (line 1), field 'prompt'")
    assert lines[2].startswith("  row 0 (line 1), field 'chosen'")
    assert lines[-1] == f"  ... and {30 - MAX_LISTED_PROBLEMS} more"


def test_parse_and_field_problems_are_reported_together_in_row_order(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": ""}\n{oops\n{"prompt": "fine"}\n{"prompt": "abcdef"}\n')
    with pytest.raises(DataError) as err:
        load_prompt_dataset(path, TOK, max_prompt_length=5)
    assert [(p.row, p.line, p.field) for p in err.value.problems] == [
        (0, 1, "prompt"),
        (1, 2, None),
        (3, 4, "prompt"),
    ]
    assert "row 3 (line 4), field 'prompt': expected at most max_prompt_length=5 tokens, got 6" in (
        str(err.value)
    )


def test_data_error_pickles() -> None:
    import pickle

    with pytest.raises(DataError) as err:
        load_prompt_dataset([{"prompt": 1}], TOK)
    copy = pickle.loads(pickle.dumps(err.value))
    assert str(copy) == str(err.value)
    assert copy.problems == err.value.problems


# ---- chat templates ---------------------------------------------------------------------------


def chat_pair(**extra: Any) -> dict[str, Any]:
    return {
        "prompt": [user("hi")],
        "chosen": [assistant("a")],
        "rejected": [assistant("b")],
        **extra,
    }


def test_template_that_breaks_the_prefix_property(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant says:{% endif %}"
    )
    path = write_jsonl(tmp_path / "chat.jsonl", [chat_pair()])
    with pytest.raises(DataError) as err:
        load_preference_dataset(path, tok)
    msg = str(err.value)
    assert "row 0 (line 1), field 'chosen': the chat template does not render the prompt" in msg
    assert "row 0 (line 1), field 'rejected'" in msg
    assert "the prompt has 'Assistant says:', prompt + completion has 'assistant: a\\n'" in msg


def test_template_that_drops_the_completion(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}"
        "{% endfor %}"
    )
    with pytest.raises(
        DataError, match=r"field 'chosen': the chat template renders the completion"
    ):
        load_preference_dataset([chat_pair()], tok)


def test_template_exceptions_become_problems() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + tok.chat_template
    )
    rows = [chat_pair(), {**chat_pair(), "prompt": [{"role": "system", "content": "s"}, user("x")]}]
    with pytest.raises(
        DataError, match=r"row 1, field 'prompt': the chat template failed: .*no system role"
    ):
        load_preference_dataset(rows, tok)


def test_missing_chat_template() -> None:
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match=r"row 0, field 'prompt': .*has no chat template"):
        load_prompt_dataset([{"prompt": [user("hi")]}], tok)
    with pytest.raises(ValueError, match="as_chat=True needs a tokenizer with a chat template"):
        load_prompt_dataset([{"prompt": "hi"}], tok, as_chat=True)
    assert len(load_prompt_dataset([{"prompt": "hi"}], tok)) == 1
