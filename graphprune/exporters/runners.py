"""Decoding loops over a KV-cache step function, in eager PyTorch, TorchScript or onnxruntime.

A runner has one method, ``step(input_ids, attention_mask, position_ids, past) -> (logits,
present)`` with the interface of :mod:`graphprune.exporters.generation`; :func:`generate` drives
any runner: a prefill of the (left-padded) prompts, then one token per step with the cache,
greedy or sampled, stopping at the end-of-text ids or ``max_new_tokens``. It times the first
token (prefill plus the first pick) and the decode steps separately.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor, nn

from graphprune.errors import ConfigError, ExportError
from graphprune.exporters.common import ort_session
from graphprune.exporters.kv import CacheLayout, KVCacheLM, read_description


class Runner(Protocol):
    layout: CacheLayout
    name: str

    def step(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: list[Tensor]) -> tuple[Tensor, list[Tensor]]: ...


class EagerRunner:
    """The Hugging Face model itself, through :class:`KVCacheLM` (the reference)."""

    name = "eager"

    def __init__(self, model: nn.Module, layout: CacheLayout | None = None) -> None:
        self.layout = layout or CacheLayout.probe(model)
        self.module = KVCacheLM(model, self.layout).eval()

    @torch.no_grad()
    def step(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        logits, *present = self.module(input_ids, attention_mask, position_ids, *past)
        return logits, present


class CompiledRunner:
    """The model's KV-cache step compiled by ``torch.compile`` (inductor) for decoding.

    Decode steps (one new token per sequence) run the compiled step, whose single graph
    carries graphprune's kernels as extern calls (``graphprune::packed_linear`` and the
    others have fake implementations) with the per-operator overhead of eager PyTorch
    gone; the cache length is a dynamic size, so the graph is compiled once per batch size
    and reused at every length. Prompts (more than one token) run the same module eagerly
    unless ``compile_prefill``: a prompt is bound by its matrix products, which the compiled
    graph calls as eager does, and each prompt shape would otherwise cost a compilation.

    The first decode step of a new batch size compiles (about 1-3 minutes for the default
    model on 2 cores; later processes reuse inductor's on-disk cache).
    """

    name = "compile"

    def __init__(self, model: nn.Module, layout: CacheLayout | None = None, *, compile_prefill: bool = False) -> None:
        self.layout = layout or CacheLayout.probe(model)
        self.module = KVCacheLM(model, self.layout).eval()
        self.compiled = torch.compile(self.module, dynamic=True)
        self.compile_prefill = compile_prefill

    @torch.inference_mode()
    def step(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        fn = self.compiled if self.compile_prefill or input_ids.shape[1] == 1 else self.module
        logits, *present = fn(input_ids, attention_mask, position_ids, *past)
        return logits, list(present)


class TorchScriptRunner:
    """A generation ``model.pt`` loaded with ``torch.jit.load``."""

    name = "torchscript"

    def __init__(self, path: Path, layout: CacheLayout) -> None:
        self.layout = layout
        self.module = load_torchscript(path)

    @torch.no_grad()
    def step(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        logits, *present = self.module(input_ids, attention_mask, position_ids, *past)
        return logits, list(present)


class OnnxRunner:
    """A generation ``model.onnx`` in an onnxruntime session (CPUExecutionProvider)."""

    name = "onnxruntime"

    def __init__(self, path: Path, layout: CacheLayout, threads: int | None = None, spinning: bool = True) -> None:
        self.layout = layout
        self.path = path
        try:
            self.session = ort_session(path, threads=threads, spinning=spinning)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ExportError(f"onnxruntime cannot load {path}: {exc}") from exc
        self.inputs = layout.input_names()
        self.outputs = layout.output_names()
        declared = {i.name for i in self.session.get_inputs()}
        produced = {o.name for o in self.session.get_outputs()}
        # position_ids is optional: decoders that apply rotary embeddings inside their
        # attention op (onnxruntime-genai's GroupQueryAttention) derive it from the mask
        missing = [n for n in self.inputs if n not in declared and n != "position_ids"]
        missing += [n for n in self.outputs if n not in produced]
        extra = declared - set(self.inputs)
        if missing or extra:
            raise ExportError(
                f"{path} does not have the generation interface: missing {missing}, unexpected inputs {sorted(extra)}."
            )
        self.feeds = [n in declared for n in self.inputs]

    def step(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        values = (input_ids, attention_mask, position_ids, *past)
        feeds = {n: t.numpy() for n, t, fed in zip(self.inputs, values, self.feeds, strict=True) if fed}
        logits, *present = self.session.run(self.outputs, feeds)
        return torch.from_numpy(logits), [torch.from_numpy(p) for p in present]


def load_torchscript(path: str | Path) -> Any:
    """``torch.jit.load`` a file, loading graphprune's operator library first when the file calls it."""
    try:
        return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except RuntimeError as exc:
        if "graphprune::" not in str(exc):
            raise
        from graphprune.kernels.packed import load_native, packed_unavailable_reason

        if not load_native():
            raise ExportError(
                f"{path} calls graphprune's native kernels, which cannot be built here ({packed_unavailable_reason()}); "
                "export the model again with the kernels lowered, or install a C++ compiler."
            ) from exc
        return torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]


def load_runner(folder: str | Path, threads: int | None = None, spinning: bool = True) -> Runner:
    """The runner of a generation export folder (its ``generation.json`` names the format);
    ``spinning=False`` keeps onnxruntime's threads from spin-waiting between runs."""
    desc = read_description(folder)
    layout = CacheLayout.from_dict(desc["layout"])
    path = Path(folder) / desc["file"]
    if desc["format"] == "onnx":
        return OnnxRunner(path, layout, threads, spinning)
    return TorchScriptRunner(path, layout)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Token id lists -> ``(input_ids, attention_mask)``, left-padded to the longest."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token.")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@dataclass
class Generation:
    """Tokens a runner generated and how long it took.

    Attributes:
        tokens: ``[batch, new]`` generated ids (rows that stopped early are padded with their
            end-of-text id).
        logits: the logits of every step ``[batch, new, vocab]`` when asked for, else ``None``.
        ttft_s: seconds from the start to the first generated token (prefill and first pick).
        decode_s: seconds of the remaining steps.
        steps: decode steps after the first token.
    """

    tokens: Tensor
    ttft_s: float
    decode_s: float
    steps: int
    logits: Tensor | None = None

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens generated after the first, over all rows, per second."""
        return self.steps * self.tokens.shape[0] / self.decode_s if self.decode_s > 0 else float("nan")


def generate(
    runner: Runner,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop_at_eos: bool = True,
    keep_logits: bool = False,
    on_token: Callable[[int, Tensor], None] | None = None,
) -> Generation:
    """Decode ``max_new_tokens`` tokens after ``input_ids`` (``[batch, seq]``, left-padded).

    ``temperature == 0`` is greedy; otherwise sampling from the softmax at that temperature,
    among the ``top_k`` best tokens when ``top_k > 0``, with a seeded generator. ``on_token``
    is called with the step index and the new ``[batch]`` ids after every step.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0 or top_k < 0:
        raise ConfigError(f"temperature and top_k must be >= 0, got {temperature} and {top_k}.")
    batch = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.long)
    gen = torch.Generator().manual_seed(seed)
    eos = torch.tensor(runner.layout.eos_token_ids or [-1], dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    out: list[Tensor] = []
    kept: list[Tensor] = []
    past = runner.layout.empty_past(batch)
    ids = input_ids.to(torch.long)
    position = (mask.cumsum(1) - 1).clamp(min=0)
    t0 = time.perf_counter()
    t_first = t0
    for step in range(max_new_tokens):
        logits, past = runner.step(ids, mask, position, past)
        last = logits[:, -1, :].float()
        if keep_logits:
            kept.append(last)
        nxt = _pick(last, temperature, top_k, gen)
        if stop_at_eos and runner.layout.eos_token_ids:
            nxt = torch.where(done, out[-1] if out else nxt, nxt)
            done |= torch.isin(nxt, eos)
        out.append(nxt)
        if step == 0:
            t_first = time.perf_counter()
        if on_token is not None:
            on_token(step, nxt)
        if stop_at_eos and bool(done.all()):
            break
        ids = nxt[:, None]
        position = position[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
    t_end = time.perf_counter()
    return Generation(
        tokens=torch.stack(out, dim=1),
        ttft_s=t_first - t0,
        decode_s=t_end - t_first,
        steps=len(out) - 1,
        logits=torch.stack(kept, dim=1) if keep_logits else None,
    )


def _pick(logits: Tensor, temperature: float, top_k: int, gen: torch.Generator) -> Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if top_k > 0:
        k = min(top_k, scaled.shape[-1])
        threshold = scaled.topk(k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def check_prompts(vocab: int, lengths: Sequence[int] = (11, 6), seed: int = 5) -> tuple[Tensor, Tensor]:
    """Seeded random prompts of ``lengths`` tokens, left-padded into one batch."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    return left_padded(prompts)


def compare_greedy(reference: Runner, candidate: Runner, tokens: int, atol: float) -> tuple[float, bool, list[dict[str, Any]]]:
    """Greedy-decode ``tokens`` tokens with both runners from the same prompts; the candidate
    must give the reference's tokens, its logits within ``atol`` along the way.

    Both decode freely (each from its own tokens). If they part, the step is accepted only
    at a tie (the reference's two best logits closer than twice the measured difference);
    later steps are then no longer comparable and the check stops there.

    Returns ``(max |Δlogits|, tokens equal, ties)``; raises :class:`ExportError` otherwise.
    """
    ids, mask = check_prompts(reference.layout.vocab)
    ref = generate(reference, ids, mask, max_new_tokens=tokens, stop_at_eos=False, keep_logits=True)
    got = generate(candidate, ids, mask, max_new_tokens=tokens, stop_at_eos=False, keep_logits=True)
    assert ref.logits is not None and got.logits is not None
    same = (ref.tokens == got.tokens).all(dim=0)  # per step, over the batch
    n = int(same.long().cumprod(0).sum())  # steps before the first divergence
    upto = min(n + 1, tokens)  # the divergent step's logits are still comparable
    diff = float((ref.logits[:, :upto] - got.logits[:, :upto]).abs().max())
    name = f"{candidate.name} generation file"
    if not diff <= atol:
        raise ExportError(
            f"the {name}'s logits differ from eager PyTorch by {diff:.3g} (> atol {atol:g}) within the first "
            f"{upto} greedy steps; the file was not written."
        )
    ties: list[dict[str, Any]] = []
    if n < tokens:
        top2 = ref.logits[:, n].topk(2, dim=-1).values
        margin = float((top2[:, 0] - top2[:, 1]).min())
        if margin > 2 * max(diff, 1e-6):
            raise ExportError(
                f"the {name} decodes other tokens than eager PyTorch from step {n} "
                f"(eager {ref.tokens[:, n].tolist()}, file {got.tokens[:, n].tolist()}; logits margin {margin:.3g}, "
                f"difference {diff:.3g}); the file was not written."
            )
        ties.append({"step": n, "margin": margin, "max_abs_diff": diff})
    return diff, n == tokens, ties


__all__ = [
    "EagerRunner",
    "Generation",
    "OnnxRunner",
    "Runner",
    "TorchScriptRunner",
    "check_prompts",
    "compare_greedy",
    "generate",
    "left_padded",
    "load_runner",
]
