"""Lazy loading: a model skeleton on the meta device, weights streamed from safetensors.

``load_lazy(folder)`` builds the model from its config with every parameter on the
``meta`` device (no storage; buffers such as rotary tables are real), and returns a
:class:`SafetensorsSource` that reads any single tensor from the folder's safetensors
shard(s) on demand. The pipeline materialises one decoder block at a time (plus the
embedding, final norm and LM head), so peak memory is bounded by one block and its
calibration statistics instead of the whole model.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor

from graphprune.errors import ModelLoadError
from graphprune.models.loader import DEFAULT_MODEL, NO_MODEL_CACHE_ENV, LoadedModel, default_model_folder, load_tokenizer

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsSource:
    """Reads named tensors from a model folder's safetensors file(s), one at a time."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        self._open = safe_open
        index, single = self.folder / INDEX, self.folder / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelLoadError(f"{index} is not a safetensors index (no weight_map): {exc}.") from exc
            self.files = {name: self.folder / shard for name, shard in weight_map.items()}
            missing = sorted({p.name for p in self.files.values() if not p.is_file()})
            if missing:
                raise ModelLoadError(f"{index} names shard(s) that are not in {self.folder}: {', '.join(missing)}.")
        elif single.is_file():
            with self._open(str(single), framework="pt", device="cpu") as handle:
                self.files = {name: single for name in handle.keys()}
        else:
            raise ModelLoadError(
                f"{self.folder} has no {SINGLE} or {INDEX}; lazy loading streams weights from safetensors."
            )

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The tensor ``name`` as ``dtype``: a fresh CPU tensor in the process's own memory.

        safetensors hands out tensors backed by a memory map of the file; the pages a read
        touches stay resident (and counted in the process's RSS) for as long as the file is
        mapped. So the file is opened for this one read and the tensor copied out, and the
        mapping goes when the read is done: the blocks already pruned do not stay resident.
        """
        path = self.files.get(name)
        if path is None:
            raise ModelLoadError(f"{self.folder} holds no tensor {name!r}.")
        with self._open(str(path), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name).to(dtype=dtype, copy=True)

    def close(self) -> None:
        """Nothing stays open between reads; kept for callers that close their sources."""


def load_lazy(spec: str, *, trust_remote_code: bool = False) -> tuple[LoadedModel, SafetensorsSource]:
    """A meta-device skeleton of the model folder ``spec`` (or of the built-in model's cached
    folder) and the source of its weights.

    Raises:
        ModelLoadError: ``spec`` is not a model folder with safetensors weights, or the
            weights do not cover every parameter of the model its config describes.
    """
    folder, name = Path(spec), None
    if spec.strip().lower() in (DEFAULT_MODEL, "default"):  # the built-in model: its cached conversion
        cached = default_model_folder()
        if cached is None:
            raise ModelLoadError(
                f"lazy loading reads the built-in model from its cached folder, and the cache is off ({NO_MODEL_CACHE_ENV}) "
                f"or cannot be written; write a folder with `graphprune convert --model {DEFAULT_MODEL} --out DIR` and pass --model DIR."
            )
        folder, name = cached, DEFAULT_MODEL
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        raise ModelLoadError(
            f"lazy loading needs a Hugging Face model folder with config.json and safetensors, got {spec!r}; "
            f"write one first with `graphprune convert --model {spec} --out DIR` and pass --model DIR."
        )
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    source = SafetensorsSource(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelLoadError(f"{folder}: cannot build the model from its config.json ({exc}).") from exc
    model.eval()
    model.tie_weights()  # tied embeddings share one parameter (from_config on meta does not tie them)
    names = {name for name, _ in model.named_parameters()}  # tied weights appear once
    missing = sorted(names - source.names())
    if missing:
        raise ModelLoadError(
            f"{folder}: the safetensors weights lack {len(missing)} parameter(s) of the model, e.g. {missing[:3]}; "
            "the folder is incomplete or belongs to another architecture."
        )
    tokenizer = load_tokenizer(folder, trust_remote_code)
    log.info("lazy skeleton of %s: %d parameters on the meta device", folder, len(names))
    return LoadedModel(model, tokenizer, name or folder.name, "hf-lazy"), source
