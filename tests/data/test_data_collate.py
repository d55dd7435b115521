"""Collation: shapes, dtypes, padding sides and masks, checked element by element.

The pad id is chosen equal to a real token id (EOS), so a mask derived from pad ids would be
wrong and these tests would catch it.
"""

from __future__ import annotations

import pytest
import torch

from tether.data import PreferenceExample, PromptExample, collate_preferences, collate_prompts

EOS = 9
PAD = EOS  # padding written with a real token's id: masks must not be derived from it


def prompt(index: int, ids: list[int]) -> PromptExample:
    return PromptExample(index=index, prompt="", prompt_ids=ids, messages=None)


def pair(index: int, p: list[int], c: list[int], r: list[int]) -> PreferenceExample:
    return PreferenceExample(index=index, prompt="", prompt_ids=p, chosen_ids=c, rejected_ids=r)


def test_collate_prompts_left_pads() -> None:
    batch = collate_prompts([prompt(4, [1, 2, 3]), prompt(7, [5]), prompt(0, [6, EOS])], PAD)
    assert set(batch) == {"input_ids", "attention_mask", "index"}
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["index"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 5], [PAD, 6, EOS]]
    assert batch["attention_mask"].tolist() == [
        [True, True, True],
        [False, False, True],
        [False, True, True],  # EOS is real though it equals the pad id
    ]
    assert batch["index"].tolist() == [4, 7, 0]


def test_collate_preferences_concatenates_chosen_then_rejected() -> None:
    examples = [
        pair(3, p=[1, 2], c=[3, EOS], r=[4, 5, 6, EOS]),
        pair(8, p=[7], c=[8, 8, 8, EOS], r=[EOS]),
    ]
    batch = collate_preferences(examples, PAD)
    assert set(batch) == {"input_ids", "attention_mask", "response_mask", "prompt_lengths", "index"}
    B, T = 2, 6  # longest row: [1, 2] + [4, 5, 6, EOS]
    assert batch["input_ids"].shape == (2 * B, T)
    assert batch["attention_mask"].dtype == batch["response_mask"].dtype == torch.bool
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, EOS, PAD, PAD],  # prompt 0 + chosen 0
        [7, 8, 8, 8, EOS, PAD],  # prompt 1 + chosen 1
        [1, 2, 4, 5, 6, EOS],  # prompt 0 + rejected 0
        [7, EOS, PAD, PAD, PAD, PAD],  # prompt 1 + rejected 1
    ]
    Y, N = True, False
    assert batch["attention_mask"].tolist() == [
        [Y, Y, Y, Y, N, N],
        [Y, Y, Y, Y, Y, N],
        [Y, Y, Y, Y, Y, Y],
        [Y, Y, N, N, N, N],
    ]
    assert batch["response_mask"].tolist() == [
        [N, N, Y, Y, N, N],
        [N, Y, Y, Y, Y, N],
        [N, N, Y, Y, Y, Y],
        [N, Y, N, N, N, N],
    ]
    assert batch["prompt_lengths"].tolist() == [2, 1, 2, 1]
    assert batch["index"].tolist() == [3, 8]


def test_response_mask_is_within_attention_mask_and_counts_response_tokens() -> None:
    examples = [pair(i, [1] * (i + 1), [2] * (3 - i), [3] * (2 * i + 1)) for i in range(3)]
    batch = collate_preferences(examples, pad_id=0)
    response, attention = batch["response_mask"], batch["attention_mask"]
    assert not (response & ~attention).any()
    lengths = [len(ex.chosen_ids) for ex in examples] + [len(ex.rejected_ids) for ex in examples]
    assert response.sum(dim=1).tolist() == lengths
    prompt_part = attention & ~response
    assert prompt_part.sum(dim=1).tolist() == batch["prompt_lengths"].tolist()
    # prompt tokens come first: every response position is after every prompt position
    positions = torch.arange(attention.shape[1])
    for i in range(2 * len(examples)):
        assert positions[prompt_part[i]].max() < positions[response[i]].min()


def test_empty_batches_are_refused() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate_prompts([], PAD)
    with pytest.raises(ValueError, match="empty batch"):
        collate_preferences([], PAD)
