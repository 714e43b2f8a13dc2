"""RotatePass: absorb one orthonormal ``Q`` into every weight around the residual stream.

With the norms folded (:class:`~graphprune.passes.fold_norms.FoldNormsPass`), every norm is
``x / rms(x)``, which commutes with an orthogonal ``Q``. A single global ``Q`` (QuaRot
style) is absorbed as

1. embeddings (token, position): ``E -> E·Q`` (the stream becomes ``x·Q``);
2. writers: ``W -> Qᵀ·W``, ``b -> Qᵀ·b`` (they add ``Qᵀ``-rotated outputs);
3. readers, including the LM head: ``W -> W·Q`` (``(xQ)(WQ)ᵀ = xWᵀ``); MoE experts held
   as batched weights likewise, each expert's ``[out, in]`` slice as a reader (gate/up, on
   the tokens routed to it) or a writer (down, its per-token weighted outputs summed into
   the stream); the router is an ordinary reader, so its choices do not change.

No new nodes and no new modules: the graph and the Hugging Face model keep their
architecture, only weight values change, and the logits do not (checked by the manager).
For a LayerNorm model the folded graph computes RMSNorm on a zero-mean stream; after a
rotation the stream is no longer zero-mean, which transformers' LayerNorm would undo, so
the model becomes graph-only (an export blocker is recorded).

Sources of ``Q`` (all float64, :mod:`graphprune.solvers.rotation`):

* ``"hadamard"`` -- a random Hadamard matrix (QuaRot), seeded by ``ctx.seed``.
* ``"pca"`` -- SliceGPT: eigenvectors of ``C = Σ_norms XᵀX/n`` where ``X`` is each block
  norm's *output* on the calibration set -- the stream with every token scaled to unit
  RMS. We use the normalised stream rather than the raw norm inputs because it is what the
  readers see and what the norm denominator measures, and because the raw stream grows
  with depth, which would let the last blocks dominate the sum. Columns are sorted by
  eigenvalue, so the first rotated dimensions carry the most energy (what slicing keeps).
* ``"learned"`` -- RotPruner: ``Q0`` (PCA, Hadamard or identity) refined with Cayley SGD on
  the orthogonal group to minimise the layer-wise reconstruction error of the *pruned*
  rotated Linears (mask of the target method recomputed every step, passed straight
  through), base weights frozen. We optimise this layer-wise objective instead of the
  language-model loss through the pruned network because a full forward/backward of the
  default model costs tens of seconds per step on two CPU cores, while the layer-wise
  objective needs only the calibration statistics collected once (one dense pass) and
  matrix products on them; its columns are then re-ordered by PCA energy so the result
  can also be sliced. The objective follows the method that prunes afterwards: for
  Wanda / magnitude (masks, no weight update) the error of the masked weights; for
  SparseGPT, ALPS and proximal (which compensate a removed weight through the input
  correlations) the Optimal Brain Surgeon saliency ``w_j² / [H⁻¹]_jj``. Learning starts
  from the identity (the model as it is): a PCA start is itself fitted to the calibration
  stream, and on the default model it is what makes Wanda overfit the calibration domain
  (PCA + Wanda 50 %: 20.65 on the protocol text but 115.9 on news prose against plain
  Wanda's 84.0), while PCA decorrelates the readers' inputs and so removes the
  correlations the Hessian solvers compensate with (SparseGPT 50 % after a PCA rotation
  has a 20 % higher layer-wise error than without rotation). MoE experts are rotated with
  the rest but are not terms of the objective (their statistics are per expert, on routed
  tokens only); the router, the shared expert and the attention Linears are.

Calibration statistics come from identity observers on the norm outputs (and, for
``"learned"``, on the writers' inputs), executed stage by stage with the
:class:`~graphprune.graph.stages.StageRunner` (no logits are computed). The observers are
removed again before the pass returns.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from graphprune.errors import ConfigError
from graphprune.graph import queries as q
from graphprune.graph.edit import add_export_blocker
from graphprune.graph.model import GraphModel
from graphprune.graph.stages import StagedGraph, StageRunner
from graphprune.graph.stream import ResidualStream, find_stream
from graphprune.passes.infra import Pass, PassContext, PassResult, Prop
from graphprune.passes.observe import InputObserver
from graphprune.solvers.rotation import ReaderSet, RotationProblem, WriterSet, learn_rotation, orthonormality_error, pca_rotation, random_hadamard
from graphprune.solvers.spec import SparsitySpec

log = logging.getLogger(__name__)

SOURCES = ("pca", "hadamard", "learned")
_OBS_PREFIX = "gp_stream_observer_"


@dataclass
class LearnConfig:
    """Settings of the learned (RotPruner) rotation.

    Attributes:
        spec: the sparsity the rotation is learned for (the pruning that follows).
        method: the pruning method; it picks the objective's mask and error (see
            :func:`graphprune.solvers.rotation.rotation_objective`): ``magnitude`` and
            ``wanda``/``gblm`` (no weight update) use the pruned weights' output error with a
            ``|W|`` or ``|W|·‖X_j‖`` mask; the solvers that update the kept weights from the
            Hessian (``sparsegpt``, ``alps``, ``proximal``) use the Optimal Brain Surgeon
            saliency ``w_j² / [H⁻¹]_jj`` (``score="obs"``).
        init: ``"identity"`` (None: the default), ``"pca"`` or ``"hadamard"``: the start of
            Cayley SGD. The identity is not fitted to anything, so every move away from the
            model as it is comes from the objective and is checked on held-out sequences; a
            PCA start is fitted to the calibration stream before any check (see the module
            docstring for what that costs out of domain).
        steps, lr, momentum: Cayley SGD (``lr`` is the rotation angle of a step).
        blocks_per_step: blocks whose Linears enter each stochastic step.
        holdout: fraction of the calibration sequences held out of the steps (the last
            ones); their statistics give the held-out objective that stops learning and picks
            the rotation returned. 0 turns held-out stopping off (fit objective only).
        check_every, patience: the held-out objective is measured every ``check_every``
            steps; learning stops after ``patience`` checks in a row without improvement.
    """

    spec: SparsitySpec
    method: str = "wanda"
    init: str | None = None
    steps: int = 40
    lr: float = 0.05
    momentum: float = 0.9
    blocks_per_step: int = 6
    holdout: float = 0.25
    check_every: int = 5
    patience: int = 2

    @property
    def score(self) -> str:
        return {"magnitude": "magnitude", "wanda": "wanda", "gblm": "wanda"}.get(self.method, "obs")

    @property
    def start(self) -> str:
        return self.init or "identity"

    @classmethod
    def from_options(cls, spec: SparsitySpec, method: str, options: dict[str, Any]) -> "LearnConfig":
        known = {"init", "steps", "lr", "momentum", "blocks_per_step", "holdout", "check_every", "patience"}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"unknown learned-rotation options {sorted(unknown)}; known: {sorted(known)}.")
        cfg = cls(spec=spec, method=method, **options)
        if not (0.0 <= cfg.holdout < 1.0):
            raise ConfigError(f"learned-rotation option holdout is a fraction in [0, 1), got {cfg.holdout}; e.g. holdout=0.25 (0: no held-out stopping).")
        if cfg.check_every < 1 or cfg.patience < 1:
            raise ConfigError(f"learned-rotation options check_every and patience are >= 1, got {cfg.check_every} and {cfg.patience}.")
        return cfg

    def split(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """The calibration sequences the steps fit on, and the held-out ones (the last
        ``round(holdout * n)``; None when held-out stopping is off)."""
        if self.holdout <= 0:
            return tokens, None
        n = int(tokens.shape[0])
        held = int(round(self.holdout * n))
        if held < 1 or held >= n:
            raise ConfigError(
                f"holding out {self.holdout:.0%} of {n} calibration sequences leaves {n - held} to fit and {held} held out; "
                "use more --calib-samples (at least 2), or --rotate-option holdout=0 to learn without held-out stopping."
            )
        return tokens[: n - held], tokens[n - held :]


@dataclass
class StreamStats:
    """Calibration statistics around the stream: per block, norm outputs and writer inputs."""

    norm_cov: dict[str, Tensor] = field(default_factory=dict)  # norm name (or DirectRead.name) -> XᵀX / n  [d, d]
    writer_cov: dict[str, Tensor] = field(default_factory=dict)  # writer name -> ZᵀZ / n
    tokens: int = 0

    def pca_cov(self) -> Tensor:
        return torch.stack(list(self.norm_cov.values())).sum(0)

    def merged(self, other: "StreamStats") -> "StreamStats":
        """The statistics of both token sets together (token-weighted means)."""
        n = self.tokens + other.tokens
        a, b = self.tokens / max(n, 1), other.tokens / max(n, 1)
        return StreamStats(
            {k: a * v + b * other.norm_cov[k] for k, v in self.norm_cov.items()},
            {k: a * v + b * other.writer_cov[k] for k, v in self.writer_cov.items()},
            n,
        )


def collect_stream_stats(gm: GraphModel, stream: ResidualStream, tokens: Tensor, batch_size: int = 8, writers: bool = False) -> StreamStats:
    """Run the calibration tokens stage by stage with observers on the block norms' outputs
    (and the block writers' inputs); return mean Gram matrices in float64."""
    graph = gm.gm.graph
    observers: dict[str, tuple[str, InputObserver]] = {}  # key -> (attr, module)

    def observe(key: str, value: Any, width: int) -> None:
        attr = f"{_OBS_PREFIX}{len(observers)}"
        mod = InputObserver(key, width, hessian=True)
        gm.gm.add_submodule(attr, mod)
        with graph.inserting_after(value):
            node = graph.call_module(attr, (value,))
        node.meta = dict(value.meta)
        value.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
        mod.enabled = True
        observers[key] = (attr, mod)

    for sn in stream.norms:
        if sn.norm.block is not None:
            observe(f"norm:{sn.norm.name}", sn.norm.output, stream.width)
    for dr in stream.direct:  # a stream value Linears read with no norm: its own statistics
        if dr.block is not None:
            observe(f"norm:{dr.name}", dr.value, stream.width)
    if writers:
        for li in stream.writers:
            if li.block is not None:
                observe(f"writer:{li.name}", li.node.args[0], li.in_features)
    gm.lint()
    gm.invalidate()
    try:
        StageRunner(StagedGraph(gm), list(tokens.split(batch_size))).run()
        stats = StreamStats()
        for key, (_, mod) in observers.items():
            st = mod.stats()
            assert st.xtx is not None  # the observers were built with hessian=True
            cov = st.xtx / max(st.count, 1)
            kind, name = key.split(":", 1)
            (stats.norm_cov if kind == "norm" else stats.writer_cov)[name] = cov
            stats.tokens = st.count
    finally:
        for node in list(graph.nodes):
            if node.op == "call_module" and str(node.target).startswith(_OBS_PREFIX):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                gm.gm.delete_submodule(node.target)
        gm.lint()
        gm.invalidate()
    return stats


def build_problem(gm: GraphModel, stream: ResidualStream, stats: StreamStats) -> RotationProblem:
    """Stack, over blocks, the readers of each norm and each writer with their statistics (float32)."""
    readers: dict[int, list[tuple[Tensor, list[Tensor]]]] = {}
    writers: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for block in gm.blocks:
        # each place the block reads the stream: behind a norm, or directly
        reads = [(sn.norm.name, sn.readers) for sn in stream.norms if sn.norm.block == block.index]
        reads += [(dr.name, dr.readers) for dr in stream.direct if dr.block == block.index]
        for j, (key, lis) in enumerate((k, r) for k, r in reads if k in stats.norm_cov):
            ws = [gm.get_attr(li.weight).detach().float() for li in lis]
            readers.setdefault(j, []).append((stats.norm_cov[key].float(), ws))
        outs = [li for li in stream.writers if li.block == block.index and li.name in stats.writer_cov]
        for j, li in enumerate(outs):
            writers.setdefault(j, []).append((gm.get_attr(li.weight).detach().float(), stats.writer_cov[li.name].float()))
    problem = RotationProblem()
    try:
        for groups in readers.values():
            weights = torch.stack([torch.cat(ws) for _, ws in groups])
            problem.readers.append(ReaderSet(torch.stack([c for c, _ in groups]), weights, [w.shape[0] for w in groups[0][1]]))
        for pairs in writers.values():
            problem.writers.append(WriterSet(torch.stack([w for w, _ in pairs]), torch.stack([c for _, c in pairs])))
    except RuntimeError as exc:  # torch.stack of different shapes
        raise ConfigError(f"{gm.name}: learned rotation needs decoder blocks of identical shapes ({exc}).") from exc
    if len({len(g) for g in readers.values()} | {len(g) for g in writers.values()}) > 1:
        raise ConfigError(f"{gm.name}: learned rotation needs every block to have the same norms and writers.")
    return problem


def check_folded(gm: GraphModel, stream: ResidualStream) -> None:
    for sn in stream.norms:
        n = sn.norm
        if n.weight is not None and not bool((gm.get_attr(n.weight) + n.offset == 1).all()):
            raise ConfigError(f"norm {n.name} still has a non-trivial scale; run FoldNormsPass before rotating.")
        if n.bias is not None and bool(gm.get_attr(n.bias).any()):
            raise ConfigError(f"norm {n.name} still has a bias; run FoldNormsPass before rotating.")
        if n.kind != "rmsnorm":
            raise ConfigError(f"norm {n.name} is a {n.kind}; run FoldNormsPass to turn it into an RMSNorm first.")


def apply_rotation(gm: GraphModel, stream: ResidualStream, rot: Tensor) -> int:
    """Absorb the orthogonal ``rot [d, d]`` into the stream's weights; returns how many tensors changed."""
    d = stream.width
    if tuple(rot.shape) != (d, d):
        raise ConfigError(f"rotation has shape {tuple(rot.shape)}, but the residual stream is {d} wide.")
    if orthonormality_error(rot) > 1e-6:
        raise ConfigError(f"rotation is not orthonormal (max |QᵀQ - I| = {orthonormality_error(rot):.2g}).")
    r = rot.double()
    done: dict[int, str] = {}

    def update(target: str, role: str, fn: Any) -> None:
        param = gm.get_attr(target)
        seen = done.get(id(param))
        if seen is not None:
            if seen != role:
                raise ConfigError(f"{q.strip_root(target)} is used as both {seen} and {role} of the stream; cannot rotate it.")
            return
        gm.set_weight(target, fn(param.detach().double()))
        done[id(param)] = role

    for _, target in stream.embeddings:
        update(target, "in", lambda e: e @ r)  # an embedding and a (tied) reader both map E -> EQ
    for li in stream.readers:
        update(li.weight, "in", lambda w: w @ r)
    for li in stream.writers:
        update(li.weight, "out", lambda w: r.T @ w)
        if li.bias is not None:
            update(li.bias, "out", lambda b: b @ r)
    # MoE experts: each expert's [out, in] slice of the batched weight, like a reader or a writer
    for e in stream.expert_readers:
        gm.set_matrix(e, gm.matrix(e).detach().double() @ r)
    for e in stream.expert_writers:
        gm.set_matrix(e, r.T @ gm.matrix(e).detach().double())
    return len(done) + len({e.weight for e in (*stream.expert_readers, *stream.expert_writers)})


class RotatePass(Pass):
    """Rotate the residual stream by a PCA, random-Hadamard, learned or given ``Q``.

    Args:
        source: ``"pca"``, ``"hadamard"``, ``"learned"``, or ``"given"`` with ``rotation``.
        rotation: a precomputed orthonormal ``Q [d, d]``; ``source`` then only labels it.
        importance: per rotated dimension, descending (what slicing needs) for ``rotation``.
        learn: settings of the learned rotation.
        samples: calibration sequences used for the statistics (None: all).
        batch_size: calibration sequences per forward.
    """

    name = "rotate"
    requires = frozenset({Prop.NORMS_FOLDED})
    establishes = frozenset({Prop.ROTATED})
    invalidates = frozenset({Prop.CALIBRATED})
    preserves_function = True

    def __init__(
        self,
        source: str = "hadamard",
        *,
        rotation: Tensor | None = None,
        importance: Tensor | None = None,
        learn: LearnConfig | None = None,
        samples: int | None = None,
        batch_size: int = 8,
    ) -> None:
        if source not in SOURCES + ("given",):
            raise ConfigError(f"unknown rotation {source!r}; choose one of: {', '.join(SOURCES)}.")
        if rotation is None and source == "given":
            raise ConfigError("source 'given' needs the rotation matrix.")
        if source == "learned" and learn is None and rotation is None:
            raise ConfigError("a learned rotation needs a LearnConfig (the sparsity it is learned for).")
        if learn is not None and learn.init not in (None, "pca", "hadamard", "identity"):
            raise ConfigError(f"unknown learned-rotation init {learn.init!r}; use pca, hadamard or identity.")
        if importance is not None and (rotation is None or importance.shape != rotation.shape[:1]):
            raise ConfigError("importance needs a given rotation and one value per rotated dimension.")
        self.source = source
        self.rotation = rotation
        self.importance = importance
        self.learn = learn
        self.samples = samples
        self.batch_size = batch_size

    def _tokens(self, ctx: PassContext) -> Tensor:
        tokens = ctx.calibration_tokens(f"a {self.source} rotation")
        return tokens[: self.samples] if self.samples else tokens

    def run(self, gm: GraphModel, ctx: PassContext) -> PassResult:
        stream = find_stream(gm)
        check_folded(gm, stream)
        d = stream.width
        info: dict[str, Any] = {"source": self.source, "width": d}
        t0 = time.perf_counter()
        importance: Tensor | None = None
        if self.rotation is not None:  # computed elsewhere (e.g. shared by several runs); source is a label
            rot, importance = self.rotation.double(), self.importance
        elif self.source == "hadamard":
            rot = random_hadamard(d, torch.Generator().manual_seed(ctx.seed))
        else:
            learned = self.source == "learned"
            tokens = self._tokens(ctx)
            fit_tokens, held_tokens = self.learn.split(tokens) if learned and self.learn is not None else (tokens, None)
            stats = collect_stream_stats(gm, stream, fit_tokens, self.batch_size, writers=learned)
            held: StreamStats | None = None
            if held_tokens is not None:
                held = collect_stream_stats(gm, stream, held_tokens, self.batch_size, writers=True)
                info["heldout_tokens"] = held.tokens
            everything = stats.merged(held) if held is not None else stats
            info["calibration_tokens"] = everything.tokens
            info["stats_seconds"] = round(time.perf_counter() - t0, 2)
            cov = everything.pca_cov()
            rot, importance = pca_rotation(cov)
            if learned:
                assert self.learn is not None
                rot = self._learn(gm, stream, stats, held, rot, ctx, info)
                # order the learned basis by energy so it can be sliced like a PCA basis
                importance = (rot * (cov @ rot)).sum(0)
                order = torch.argsort(importance, descending=True)
                rot, importance = rot[:, order], importance[order]
        changed = apply_rotation(gm, stream, rot)
        if gm.state.stream_centred:
            add_export_blocker(gm, "the stream of a LayerNorm model was rotated; transformers' LayerNorm would subtract its (now non-zero) mean")
        info["seconds"] = round(time.perf_counter() - t0, 2)
        info["orthonormality_error"] = orthonormality_error(rot)
        gm.state.rotation = {**info, "importance": importance}
        gm.invalidate()
        return PassResult(gm, modified=changed > 0, stats={k: v for k, v in info.items()})

    def _learn(
        self, gm: GraphModel, stream: ResidualStream, stats: StreamStats, held: StreamStats | None, pca: Tensor, ctx: PassContext, info: dict[str, Any]
    ) -> Tensor:
        cfg = self.learn
        assert cfg is not None
        d = stream.width
        if cfg.start == "pca":
            q0 = pca
        elif cfg.start == "hadamard":
            q0 = random_hadamard(d, torch.Generator().manual_seed(ctx.seed))
        else:
            q0 = torch.eye(d, dtype=torch.float64)
        problem = build_problem(gm, stream, stats)
        heldout = build_problem(gm, stream, held) if held is not None else None
        score = cfg.score
        with tqdm(total=cfg.steps, desc=f"learn rotation ({score})", unit="step", disable=not ctx.progress, leave=False) as bar:

            def tick(step: int, loss: float) -> None:
                bar.set_postfix(objective=f"{loss:.5f}", refresh=False)
                bar.update(1)

            res = learn_rotation(
                q0, problem, cfg.spec, steps=cfg.steps, lr=cfg.lr, momentum=cfg.momentum,
                blocks_per_step=cfg.blocks_per_step, score=score, seed=ctx.seed, callback=tick,
                heldout=heldout, check_every=cfg.check_every, patience=cfg.patience,
            )
        info.update(
            {
                "init": cfg.start,
                "target": str(cfg.spec),
                "mask_score": score,
                "steps": cfg.steps,
                "objective_initial": round(res.initial_loss, 6),
                "objective_final": round(res.final_loss, 6),
                "kept_initial": res.kept_initial,
            }
        )
        if heldout is not None:
            info.update(
                {
                    "holdout": cfg.holdout,
                    "heldout_objective": [[step, round(value, 6)] for step, value in res.heldout],
                    "best_step": res.best_step,
                    "stopped_at": res.stopped_at,
                }
            )
        if not math.isfinite(res.final_loss):
            raise ConfigError("learned rotation diverged (non-finite objective); lower lr.")
        return res.q
