"""The config of supervised fine-tuning (``tether train sft``): :class:`SFTConfig`, trained by
:func:`tether.train.sft.train` (which re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass

from tether.configs.common import TrainConfig
from tether.runs.config import option


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on prompt-completion, conversational or text rows."""

    train_data: str = option(
        "",
        help="SFT data (JSONL/JSON/CSV/Parquet): prompt/completion, messages, or text columns.",
    )
    eval_data: str | None = option(None, help="Held-out SFT data (default: a split of train_data).")
    eval_fraction: float = option(
        0.1, help="Fraction of train_data held out when eval_data is null (0: no held-out NLL)."
    )
    eval_steps: int = option(
        50,
        help="Held-out NLL every N steps, besides before training and at the end (0: only those).",
    )
    max_length: int = option(1024, help="Max tokens per row (prompt + completion, or all turns).")
    truncate: bool = option(
        True, help="Cut a row longer than max_length at its end (false: such a row is an error)."
    )
    as_chat: bool = option(
        False, help="Wrap plain-string prompts/completions as chat messages (chat template)."
    )
    completion_only_loss: bool = option(
        True,
        help="Loss on completions / assistant turns only (false: on every token of the row).",
    )
    packing: bool = option(
        True,
        help="Run the forward padding-free (sequences packed into fewer rows; same loss up to "
        "float summation order) when a batch has ≥10% padding.",
    )
    learning_rate: float = option(2e-5, help="AdamW peak learning rate.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_steps < 0:
            raise ValueError(
                f"eval_steps must be ≥ 0 (0: before and after only), got {self.eval_steps}"
            )
        if self.max_length < 2:
            raise ValueError(
                f"max_length must be ≥ 2 (a prompt and a target), got {self.max_length}"
            )
