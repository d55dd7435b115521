"""Prompt and preference datasets: loading with validation, chat templates, collation.

ds = load_preference_dataset("pairs.jsonl", tokenizer, max_length=1024)
loader = DataLoader(ds, batch_size=8, collate_fn=partial(collate_preferences, pad_id=pad))
"""

from tether.data.collate import collate_preferences, collate_prompts, pad_sequences
from tether.data.errors import DataError, Problem
from tether.data.examples import PreferenceDataset, PreferenceExample, PromptDataset, PromptExample
from tether.data.loading import load_preference_dataset, load_prompt_dataset

__all__ = [
    "DataError",
    "PreferenceDataset",
    "PreferenceExample",
    "Problem",
    "PromptDataset",
    "PromptExample",
    "collate_preferences",
    "collate_prompts",
    "load_preference_dataset",
    "load_prompt_dataset",
    "pad_sequences",
]
