"""FoldNormsPass: make every norm on the residual stream a plain, scale-free RMSNorm.

A rotation ``Q`` of the stream commutes with ``x / rms(x)`` but not with a per-channel
scale or a mean subtraction, so both move into the neighbouring Linears first:

1. **LayerNorm family (OPT)**: centring. Every stream writer -- embedding tables (token
   and position) and the Linears adding into the stream -- gets its outputs' mean removed
   (``E -> E - mean_row(E)``, ``W -> (I - 11ᵀ/d) W``, ``b -> b - mean(b)``). The stream then
   has zero mean everywhere, so each LayerNorm's mean subtraction is a no-op and the norm
   equals ``x·rsqrt(mean(x²) + eps)``: the graph's ``aten.layer_norm`` nodes are rewritten
   into that RMSNorm pattern (the Hugging Face LayerNorm modules keep weight 1 / bias 0,
   so the saved model computes the same thing up to float rounding).
2. ``norm(x)·g + β`` feeding ``W, b`` -> ``norm(x)`` feeding ``W·diag(g)``, ``b + Wβ``; the norm's
   weight becomes ones (the model stays a standard Hugging Face model). A reader without a
   bias gets one only when ``β ≠ 0`` (OPT's LM head behind the final LayerNorm): that
   bias exists in the graph and the in-memory model, but transformers' OPT cannot load
   it, which is recorded as an export blocker.
3. The final norm folds into the LM head. When the head shares its table with the token
   embedding (tied, like SmolLM2; or any tied LayerNorm model, whose tables centring
   changes), the head is untied first -- it gets its own copy of the
   table and the config says ``tie_word_embeddings = False`` -- since ``E`` and
   ``E·diag(g)`` differ. This adds ``vocab × d`` parameters.

Computed in float64, written back in the weights' dtype. The pass preserves the logits.
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor
from torch.fx import Node

from graphprune.errors import ConfigError
from graphprune.graph import queries as q
from graphprune.graph.capture import ROOT
from graphprune.graph.edit import add_export_blocker, add_linear_bias, get_attr_node, own_weight_target, set_config, set_module_parameter
from graphprune.graph.model import GraphModel
from graphprune.graph.stream import ADAPTER_ATTR, ResidualStream, find_stream
from graphprune.passes.infra import Pass, PassContext, PassResult, Prop

log = logging.getLogger(__name__)
aten = torch.ops.aten

def _w64(gm: GraphModel, target: str) -> Tensor:
    return gm.get_attr(target).detach().double()


def untie_lm_head(gm: GraphModel, stream: ResidualStream) -> bool:
    """Give the LM head its own copy of a table it shares with an embedding; False if not shared.

    Every embedding lookup then reads its own module's attribute, the head a fresh parameter,
    and the config says ``tie_word_embeddings = False`` so a saved model loads both.
    """
    head = stream.lm_head
    if head is None:
        return False
    table = gm.get_attr(head.weight)
    lookups = [*stream.embeddings, *stream.normed_embeddings]
    if not any(gm.get_attr(t) is table for _, t in lookups):
        return False
    for node, _ in lookups:
        own = own_weight_target(gm, node)
        node.replace_input_with(node.args[0], get_attr_node(gm, own))  # type: ignore[arg-type]
    set_module_parameter(gm, head.name, "weight", table.detach().clone())
    own_head = own_weight_target(gm, head.node)
    head.node.replace_input_with(head.node.args[1], get_attr_node(gm, own_head))  # type: ignore[arg-type]
    head.weight = own_head
    set_config(gm.model, tie_word_embeddings=False)
    gm.lint()
    gm.invalidate()
    log.info("%s: untied the LM head from the embedding", gm.name)
    return True


class FoldNormsPass(Pass):
    """Fold norm scales and biases into the Linears that read them (LayerNorm centred first)."""

    name = "fold_norms"
    establishes = frozenset({Prop.NORMS_FOLDED})
    preserves_function = True

    def run(self, gm: GraphModel, ctx: PassContext) -> PassResult:
        stream = find_stream(gm)
        scaled = self._fold_scales(gm, stream) if stream.scales else 0
        if scaled:
            stream = find_stream(gm)
        adapted = self._adapt_post_norms(gm, stream) if stream.post_norms else 0
        if adapted:
            stream = find_stream(gm)
        centred, untied = 0, False
        # an embedding reaching the stream through a norm keeps its table; a head sharing it must not
        if stream.normed_embeddings and untie_lm_head(gm, stream):
            untied, stream = True, find_stream(gm)
        kinds = stream.kinds
        if len(kinds) > 1:
            raise ConfigError(f"{gm.name}: the stream mixes {sorted(kinds)}; folding needs one norm kind.")
        if kinds == {"layernorm"}:
            if stream.expert_writers:
                raise ConfigError(f"{gm.name}: centring a LayerNorm stream that MoE experts write is not supported.")
            if stream.direct:
                raise ConfigError(
                    f"{gm.name}: {stream.direct[0].readers[0].name} reads the LayerNorm stream with no norm in between; "
                    "centring the stream would change what it reads. Such a model cannot be folded."
                )
            # centring rewrites the embedding tables; a head sharing one must keep the original
            if untie_lm_head(gm, stream):
                untied, stream = True, find_stream(gm)
            centred = self._centre(gm, stream)
        untied = self._untie_head(gm, stream) or untied
        folded = 0
        for sn in stream.norms:
            folded += self._fold(gm, sn.norm, sn.readers, sn.experts)
        rewritten = self._layernorm_to_rms(gm, stream) if kinds == {"layernorm"} else 0
        if kinds == {"layernorm"}:
            gm.state.stream_centred = True
        gm.lint()
        gm.invalidate()
        stats = {"norms": len(stream.norms), "folded": folded, "centred": centred, "untied": untied, "layernorms_to_rms": rewritten, "scales_folded": scaled,
                 "post_norm_adapters": adapted}
        return PassResult(gm, modified=bool(folded or centred or untied or rewritten or scaled or adapted), stats=stats)

    # -------------------------------------------------------------- 0b. post-block norms
    @staticmethod
    def _adapt_post_norms(gm: GraphModel, stream: ResidualStream) -> int:
        """Give each post-norm an adapter Linear holding its scale: ``norm(y)·g -> linear(norm(y), diag(g))``.

        A norm between a block's output projection and the residual add writes the stream
        through its per-channel scale, which no rotation of the stream passes through. As a
        ``d x d`` Linear (``diag(g)``, and the norm's bias as its bias) the scale becomes an
        ordinary stream writer that rotation and slicing transform (SliceGPT's extra matrix);
        the norm itself keeps only the scale-free normalisation, computed in the block's own
        basis. Adapters stay dense (not pruned) and transformers' class has no place for them,
        which is recorded as an export blocker. A norm between the embedding and the stream
        (BLOOM's embedding LayerNorm) gets the same treatment: the adapter, not the embedding
        table, then starts the stream.
        """
        graph = gm.gm.graph
        count = 0
        for ni in stream.post_norms:
            out = ni.output
            target = f"{ROOT}.{ni.name}.{ADAPTER_ATTR}"
            dtype = gm.get_attr(ni.weight).dtype if ni.weight is not None else out.meta["val"].dtype
            if ni.kind == "layernorm" and not ni.internals and out.target is aten.layer_norm.default:
                # BLOOM's embedding LayerNorm: layer_norm(x, w, b) -> linear(layer_norm(x), diag(w), b)
                width = int(out.meta["val"].shape[-1])
                g = _w64(gm, ni.weight) if ni.weight is not None else torch.ones(width, dtype=torch.float64)
                set_module_parameter(gm, ni.name, ADAPTER_ATTR, torch.diag(g).to(dtype))
                bias = None
                if ni.bias is not None:
                    set_module_parameter(gm, ni.name, f"{ADAPTER_ATTR}_bias", _w64(gm, ni.bias).to(dtype))
                with graph.inserting_before(out):
                    plain = graph.call_function(aten.layer_norm.default, (out.args[0], out.args[1], None, None, ni.eps))
                    weight = get_attr_node(gm, target)
                    if ni.bias is not None:
                        bias = get_attr_node(gm, target + "_bias")
                    lin = graph.call_function(aten.linear.default, (plain, weight, bias) if bias is not None else (plain, weight))
                plain.meta = {k: v for k, v in out.meta.items()}
            else:
                if ni.kind != "rmsnorm" or ni.internals or out.target is not aten.mul.Tensor or ni.weight is None:
                    raise ConfigError(
                        f"{gm.name}: the post-block norm {ni.name} is a {ni.kind} without a separate scale multiplication; "
                        "only scaled RMSNorms and whole LayerNorms get adapters so far, so this architecture cannot be rotated."
                    )
                normed = next(a for a in out.args if isinstance(a, Node) and q._norm_scale(gm.gm, a) is None)
                g = _w64(gm, ni.weight) + ni.offset
                set_module_parameter(gm, ni.name, ADAPTER_ATTR, torch.diag(g).to(dtype))
                with graph.inserting_before(out):
                    weight = get_attr_node(gm, target)
                    lin = graph.call_function(aten.linear.default, (normed, weight))
            lin.meta = {k: v for k, v in out.meta.items()}
            out.replace_all_uses_with(lin)
            graph.erase_node(out)
            gm.state.adapters.append(ni.name)
            add_export_blocker(
                gm, f"{ni.name}: the norm's scale became a {g.numel()}x{g.numel()} adapter matrix, "
                f"which transformers' {type(gm.model).__name__} has no place for"
            )
            count += 1
        gm.lint()
        gm.invalidate()
        log.info("%s: %d post-block norms got adapter Linears", gm.name, count)
        return count

    # -------------------------------------------------------------- 0. constant factors on the stream
    @staticmethod
    def _fold_scales(gm: GraphModel, stream: ResidualStream) -> int:
        """Fold ``writer * c`` into the writer (embedding table or Linear weight and bias) and drop the product.

        A scaled embedding whose table the LM head shares is untied first (the head keeps the
        unscaled table). A factor held in a model buffer (Gemma's ``embed_scale``) is set to 1,
        so the model computes what the graph does; a factor written in the model's code
        (Granite's multipliers) cannot be changed there, which is recorded as an export blocker.
        """
        lookups = {node for node, _ in stream.embeddings}
        if any(sc.source in lookups for sc in stream.scales) and untie_lm_head(gm, stream):
            stream = find_stream(gm)
            lookups = {node for node, _ in stream.embeddings}
        linears = {li.node: li for li in gm.linears}
        graph = gm.gm.graph
        for sc in stream.scales:
            if sc.source in lookups:
                table = str(sc.source.args[0].target)  # type: ignore[union-attr]
                gm.set_weight(table, _w64(gm, table) * sc.factor)
                what = table
            else:
                li = linears[sc.source]
                gm.set_weight(li.weight, _w64(gm, li.weight) * sc.factor)
                if li.bias is not None:
                    gm.set_weight(li.bias, _w64(gm, li.bias) * sc.factor)
                what = li.name
            if sc.buffer is not None:
                gm.set_weight(sc.buffer, torch.ones_like(gm.get_attr(sc.buffer)))
            else:
                add_export_blocker(
                    gm, f"{q.module_path(sc.node) or gm.name}: the constant factor {sc.factor:g} was folded into {what}, "
                    f"but transformers' {type(gm.model).__name__} still applies it in its code"
                )
            sc.node.replace_all_uses_with(sc.source)
            graph.erase_node(sc.node)
        gm.lint()
        gm.invalidate()
        log.info("%s: folded %d constant stream factors into their writers", gm.name, len(stream.scales))
        return len(stream.scales)

    # -------------------------------------------------------------- 1. centring (LayerNorm only)
    @staticmethod
    def _centre(gm: GraphModel, stream: ResidualStream) -> int:
        done: set[int] = set()
        for _, target in stream.embeddings:
            param = gm.get_attr(target)
            if id(param) not in done:
                e = param.detach().double()
                gm.set_weight(target, e - e.mean(1, keepdim=True))
                done.add(id(param))
        for li in stream.writers:
            w = _w64(gm, li.weight)
            gm.set_weight(li.weight, w - w.mean(0, keepdim=True))
            if li.bias is not None:
                b = _w64(gm, li.bias)
                gm.set_weight(li.bias, b - b.mean())
            done.add(id(gm.get_attr(li.weight)))
        return len(done)

    # -------------------------------------------------------------- 3. untie a tied LM head
    @staticmethod
    def _untie_head(gm: GraphModel, stream: ResidualStream) -> bool:
        final = stream.final_norm
        if final is None or final.norm.weight is None:
            return False
        if bool((gm.get_attr(final.norm.weight) + final.norm.offset == 1).all()) and final.norm.bias is None:
            return False  # nothing to fold into the head
        return untie_lm_head(gm, stream)

    # -------------------------------------------------------------- 2. fold scale and bias
    @staticmethod
    def _fold(gm: GraphModel, norm: q.NormInfo, readers: list[q.LinearInfo], experts: list[q.ExpertInfo]) -> int:
        g = _w64(gm, norm.weight) + norm.offset if norm.weight is not None else None
        beta = _w64(gm, norm.bias) if norm.bias is not None else None
        if beta is not None and not beta.any():
            beta = None
        if g is None and beta is None:
            return 0
        if beta is not None and experts:
            raise ConfigError(f"{gm.name}: {norm.name} has a bias, and the MoE experts reading it have none to take it; cannot fold it.")
        for e in experts:  # each expert's slice of the batched weight, like a reader Linear
            if g is not None:
                gm.set_matrix(e, gm.matrix(e).detach().double() * g)
        for li in readers:
            w = _w64(gm, li.weight)
            if beta is not None:
                shift = w @ beta
                if li.bias is not None:
                    gm.set_weight(li.bias, _w64(gm, li.bias) + shift)
                else:
                    li.bias = add_linear_bias(gm, li, shift)
                    add_export_blocker(
                        gm, f"{li.name} got a bias from folding {norm.name}'s bias; transformers' {type(gm.model).__name__} cannot load it"
                    )
            if g is not None:
                gm.set_weight(li.weight, w * g)
        if norm.weight is not None:  # a unit scale: 1 - offset (0 for Gemma's 1 + w)
            gm.set_weight(norm.weight, torch.full_like(gm.get_attr(norm.weight), 1.0 - norm.offset))
        if norm.bias is not None:
            gm.set_weight(norm.bias, torch.zeros_like(gm.get_attr(norm.bias)))
        return 1

    # -------------------------------------------------------------- 1b. LayerNorm -> RMSNorm
    @staticmethod
    def _layernorm_to_rms(gm: GraphModel, stream: ResidualStream) -> int:
        graph = gm.gm.graph
        count = 0
        for sn in stream.norms:
            if sn.norm.internals:  # written out: the centred stream makes y - mean(y) just y
                mean, *subs = sn.norm.internals
                for sub in subs:
                    sub.replace_all_uses_with(sn.norm.input)
                    graph.erase_node(sub)
                if not mean.users:
                    graph.erase_node(mean)
                count += 1
                continue
            ln = sn.norm.output
            if ln.target is not aten.layer_norm.default:
                continue
            x = ln.args[0]
            meta = {k: v for k, v in ln.meta.items() if k != "val"}
            with graph.inserting_before(ln):
                pw = graph.call_function(aten.pow.Tensor_Scalar, (x, 2))
                mean = graph.call_function(aten.mean.dim, (pw, [-1], True))
                add = graph.call_function(aten.add.Tensor, (mean, sn.norm.eps))
                rs = graph.call_function(aten.rsqrt.default, (add,))
                out = graph.call_function(aten.mul.Tensor, (x, rs))
            for node in (pw, mean, add, rs, out):
                node.meta = dict(meta)
            if "val" in ln.meta:
                out.meta["val"] = ln.meta["val"]
            ln.replace_all_uses_with(out)
            graph.erase_node(ln)
            count += 1
        return count
