"""The KV-cache step interface shared by generation exports and their runners.

:class:`CacheLayout` says what a model's cache looks like, layer by layer (read from the
model by a probe forward, so layers may differ in width); :class:`KVCacheLM` is the function
every generation file computes: ``(input_ids, attention_mask, position_ids, *past) ->
(logits of the last position, *present)``. See :mod:`graphprune.exporters.generation`.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from graphprune.errors import ConfigError, ExportError
from graphprune.exporters.common import eval_mode, vocab_size

GENERATION_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
#: the description file of an exported generation folder
DESCRIPTION = "generation.json"


@dataclass(frozen=True)
class CacheLayout:
    """Shapes of a model's KV cache, per layer: ``(kv_heads, head_dim)`` of keys and of values."""

    keys: tuple[tuple[int, int], ...]
    values: tuple[tuple[int, int], ...]
    vocab: int
    eos_token_ids: tuple[int, ...] = ()

    @property
    def layers(self) -> int:
        return len(self.keys)

    def input_names(self) -> list[str]:
        past = [f"past_key_values.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        return ["input_ids", "attention_mask", "position_ids", *past]

    def output_names(self) -> list[str]:
        return ["logits", *[f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]]

    def empty_past(self, batch: int, length: int = 0) -> list[Tensor]:
        """Zero cache tensors for ``batch`` sequences of ``length`` cached tokens."""
        out = []
        for (kh, kd), (vh, vd) in zip(self.keys, self.values, strict=True):
            out += [torch.zeros(batch, kh, length, kd), torch.zeros(batch, vh, length, vd)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"keys": [list(k) for k in self.keys], "values": [list(v) for v in self.values], "vocab": self.vocab, "eos_token_ids": list(self.eos_token_ids)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheLayout":
        return cls(
            tuple((int(h), int(d)) for h, d in data["keys"]),
            tuple((int(h), int(d)) for h, d in data["values"]),
            int(data["vocab"]),
            tuple(int(t) for t in data.get("eos_token_ids", ())),
        )

    @classmethod
    def probe(cls, model: nn.Module) -> "CacheLayout":
        """Run ``model`` on two tokens with a cache and read each layer's cache shapes."""
        vocab = vocab_size(model)
        if vocab is None:
            raise ExportError(f"{type(model).__name__} has no config.vocab_size; generation exports need a Hugging Face causal LM.")
        ids = torch.zeros(1, 2, dtype=torch.long)
        with eval_mode(model), torch.no_grad():
            out = model(input_ids=ids, use_cache=True, return_dict=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        layers = getattr(cache, "layers", None)
        if not layers:
            raise ExportError(
                f"{type(model).__name__} returned no key/value cache (got {type(cache).__name__}); "
                "generation exports need a model whose forward takes and returns a transformers Cache."
            )
        keys = tuple((int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in layers)
        values = tuple((int(layer.values.shape[1]), int(layer.values.shape[3])) for layer in layers)
        return cls(keys, values, vocab, eos_ids(model))


def eos_ids(model: nn.Module) -> tuple[int, ...]:
    """The end-of-text ids of a Hugging Face model's generation config (or config)."""
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return tuple(int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return ()


class KVCacheLM(nn.Module):
    """The exported function: ``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``.

    ``past`` is the flat list ``[key_0, value_0, key_1, value_1, ...]``; it is wrapped into a
    transformers ``DynamicCache`` inside the forward, so the traced graph has plain tensor
    inputs and outputs. The LM head runs on the last position only (``logits_to_keep=1``
    where the model supports it, otherwise the logits are sliced).
    """

    def __init__(self, model: nn.Module, layout: CacheLayout) -> None:
        super().__init__()
        self.lm = model
        self.layout = layout
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep = "logits_to_keep" in params

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layout.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        kwargs: dict[str, Any] = {self._cache_arg: cache}
        if self._keep:
            kwargs["logits_to_keep"] = 1
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, return_dict=True, **kwargs)
        logits = out.logits[:, -1:, :]
        present: list[Tensor] = []
        for layer in cast(list[Any], cache.layers):  # DynamicLayer: .keys / .values [batch, heads, past + seq, dim]
            present += [layer.keys, layer.values]
        return (logits, *present)


def read_description(folder: str | Path) -> dict[str, Any]:
    """The ``generation.json`` of an exported folder, checked; for a folder written by
    onnxruntime-genai's model builder (``genai_config.json``), the same description read
    from its config (:func:`describe_genai`)."""
    path = Path(folder) / DESCRIPTION
    if not path.is_file() and (Path(folder) / GENAI_CONFIG).is_file():
        return describe_genai(folder)
    if not path.is_file():
        raise ConfigError(f"{folder} has no {DESCRIPTION}; it is not a generation export (make one with `graphprune export MODEL --for generation --out DIR`).")
    try:
        data = json.loads(path.read_text())
        fmt, name = data["format"], data["file"]
        CacheLayout.from_dict(data["layout"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is malformed ({type(exc).__name__}: {exc}); export the model again.") from exc
    if fmt not in GENERATION_FORMATS:
        raise ConfigError(f"{path} names format {fmt!r}; expected one of {list(GENERATION_FORMATS)}.")
    if not (Path(folder) / name).is_file():
        raise ConfigError(f"{path} names {name}, which is missing; export the model again.")
    return dict(data)


#: the config file of an onnxruntime-genai model folder
GENAI_CONFIG = "genai_config.json"
_GENAI_NAMES = {
    "past_key_names": "past_key_values.%d.key",
    "past_value_names": "past_key_values.%d.value",
    "present_key_names": "present.%d.key",
    "present_value_names": "present.%d.value",
}


def describe_genai(folder: str | Path) -> dict[str, Any]:
    """A generation description of an onnxruntime-genai folder (its decoder file, cache
    shapes and end-of-text ids), so graphprune's runners, ``generate`` and ``bench`` run it
    through the same loop as graphprune's own exports. Its decoder must use the tensor
    names graphprune uses (the model builder's defaults for decoder-only models); a
    ``position_ids`` input is optional (the builder drops it when attention applies the
    rotary embedding itself)."""
    path = Path(folder) / GENAI_CONFIG
    try:
        config = json.loads(path.read_text())
        model = config["model"]
        decoder = model["decoder"]
        layers = int(decoder["num_hidden_layers"])
        heads = int(decoder["num_key_value_heads"])
        head = int(decoder["head_size"])
        vocab = int(model["vocab_size"])
        name = str(decoder["filename"])
        names = {**decoder.get("inputs", {}), **decoder.get("outputs", {})}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not an onnxruntime-genai config graphprune can read ({type(exc).__name__}: {exc}).") from exc
    other = {k: names[k] for k, v in _GENAI_NAMES.items() if names.get(k, v) != v}
    if other:
        raise ConfigError(f"{path} names its cache tensors {other}; graphprune runs decoders whose names are {_GENAI_NAMES}.")
    if not (Path(folder) / name).is_file():
        raise ConfigError(f"{path} names the decoder {name}, which is missing.")
    eos = model.get("eos_token_id", ())
    eos_ids = tuple(int(t) for t in (eos if isinstance(eos, list) else [eos]))
    layout = CacheLayout(((heads, head),) * layers, ((heads, head),) * layers, vocab, eos_ids)
    return {"format": "onnx", "file": name, "layout": layout.to_dict(), "model": model.get("type", "?"), "origin": "onnxruntime-genai"}


__all__ = ["DESCRIPTION", "GENAI_CONFIG", "GENERATION_FORMATS", "CacheLayout", "KVCacheLM", "describe_genai", "eos_ids", "read_description"]
