"""Stage-at-a-time weights: materialise one block's parameters, release them when done.

A :class:`LazyWeights` serves a :class:`~graphprune.graph.model.GraphModel` whose model
was built on the ``meta`` device (:func:`graphprune.models.lazy.load_lazy`). Parameters
are fetched by their Hugging Face name, swapped into every module tree that holds them
(the model, the captured graph and a stage split), and swapped back to storage-less meta
tensors once the stage is finished and written, so at any time only the embedding, the
final norm, the LM head and the block being pruned occupy memory.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import Tensor, nn

from graphprune.errors import ModelLoadError
from graphprune.graph.edit import replace_tensor
from graphprune.graph.model import GraphModel

log = logging.getLogger(__name__)


def retarget_meta(gm: GraphModel, device: torch.device | str = "cpu") -> int:
    """Replace every ``device=meta`` constant the capture baked into the graph by ``device``.

    Tracing a model whose parameters live on the meta device records that device in
    device-checking and tensor-creating operators (``_assert_tensor_metadata``, ``arange``,
    ``zeros``...); the graph then runs on real weights only after this rewrite.
    Returns the number of nodes changed.
    """
    target = torch.device(device)
    meta = torch.device("meta")

    def swap(value: Any) -> Any:
        return target if isinstance(value, torch.device) and value == meta else value

    changed = 0
    for node in gm.gm.graph.nodes:
        args = torch.fx.node.map_aggregate(node.args, swap)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, swap)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs  # type: ignore[assignment]
            changed += 1
    if changed:
        gm.lint()
    return changed


class LazyWeights:
    """Loads and releases parameters of a meta-device model by block.

    Args:
        gm: the captured model (its parameters start on the meta device).
        fetch: ``HF parameter name -> tensor`` (e.g. :meth:`SafetensorsSource.get`).
    """

    def __init__(self, gm: GraphModel, fetch: Callable[[str], Tensor]) -> None:
        self.gm = gm
        self.fetch = fetch
        self.names = [name for name, _ in gm.model.named_parameters()]  # tied weights once
        prefixes = [f"{b.name}." for b in gm.blocks]
        self.by_block: list[list[str]] = [[n for n in self.names if n.startswith(p)] for p in prefixes]
        in_blocks = {n for names in self.by_block for n in names}
        self.shared = [n for n in self.names if n not in in_blocks]  # embedding, final norm, LM head

    def _param(self, name: str) -> nn.Parameter:
        return self.gm.model.get_parameter(name)

    def load(self, names: Iterable[str], also: Iterable[nn.Module] = ()) -> None:
        also = list(also)
        for name in names:
            old = self._param(name)
            if old.device.type != "meta":
                continue
            value = self.fetch(name)
            if tuple(value.shape) != tuple(old.shape):
                raise ModelLoadError(f"{name}: the weights file holds shape {tuple(value.shape)}, the model expects {tuple(old.shape)}.")
            if not torch.isfinite(value).all():
                raise ModelLoadError(f"{name}: the weights file holds NaN/Inf values; the file is corrupt.")
            replace_tensor(self.gm, old, value, also)

    def release(self, names: Iterable[str], also: Iterable[nn.Module] = ()) -> None:
        also = list(also)
        for name in names:
            old = self._param(name)
            if old.device.type == "meta":
                continue
            replace_tensor(self.gm, old, torch.empty(old.shape, dtype=old.dtype, device="meta"), also)

    def tensors(self, names: Iterable[str]) -> dict[str, Tensor]:
        """Current values of ``names`` (materialised ones only)."""
        return {n: self._param(n).detach() for n in names}

    def materialised_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.gm.model.parameters() if p.device.type != "meta")


class ShardWriter(Protocol):
    """Writes a model folder one shard at a time (see ``graphprune.exporters.hf.ShardedWriter``)."""

    def add(self, tensors: dict[str, Tensor]) -> None: ...

    def finish(self, model: nn.Module, tokenizer: Any, extra_json: dict[str, Any]) -> object: ...

    def abort(self) -> None: ...


class LazyStageIO:
    """Stage hooks of lazy pruning: load a block from safetensors, write it when pruned, free it."""

    def __init__(self, weights: LazyWeights, writer: ShardWriter | None) -> None:
        self.weights = weights
        self.writer = writer  # None on ranks other than 0
        self.peak_bytes = 0

    def _track(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.weights.materialised_bytes())

    def begin(self, roots: list[torch.nn.Module]) -> None:
        self.weights.load(self.weights.shared, roots)  # embedding, final norm, LM head
        self._track()

    def enter(self, block: int, roots: list[torch.nn.Module]) -> None:
        self.weights.load(self.weights.by_block[block], roots)
        self._track()

    def leave(self, block: int, roots: list[torch.nn.Module]) -> None:
        names = self.weights.by_block[block]
        if self.writer is not None:
            self.writer.add(self.weights.tensors(names))
        self.weights.release(names, roots)

    def finish(self, model: nn.Module, tokenizer: Any, report: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.add(self.weights.tensors(self.weights.shared))
            self.writer.finish(model, tokenizer, extra_json={"report.json": report})

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()

    def summary(self) -> dict[str, Any]:
        return {"peak_materialised_mb": round(self.peak_bytes / 2**20, 1), "shards": len(self.weights.by_block) + 1}
