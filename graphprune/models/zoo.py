"""Tiny random models of every decoder family people prune, built from transformers configs in code.

Each entry of :data:`ZOO` builds a 2-layer, 64-wide model of one architecture family with
the family's distinguishing features switched on (biases on q/k/v, norms inside attention,
scaled embeddings, post-block norms, soft-capping, fused projections, parallel blocks,
Conv1D, ALiBi, experts), a 256-token vocabulary (the byte tokenizer) and deterministic
random weights. They are what the architecture test matrix and
``benchmarks/zoo_matrix.py`` run, and they load by name like the other tiny models
(``graphprune prune tiny-gemma2 ...``).

Nothing is downloaded: the configs are written here and the weights drawn from a seeded
generator (:func:`graphprune.models.tiny._finish`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import torch

from graphprune.models.tiny import TINY_MODELS, TINY_VOCAB, _finish

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Sizes shared by every family (transformers' common config names).
_COMMON: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
}


@dataclass(frozen=True)
class Family:
    """One architecture family of the zoo.

    Attributes:
        name: the family (``mistral``, ``gemma2``...); the model loads as ``tiny-<name>``.
        config: the transformers config class name.
        model: the transformers causal-LM class name.
        features: what makes the family different, for the support table.
        overrides: config values on top of :data:`_COMMON` (and replacing its names where the
            family spells them differently).
        attn: attention implementation (``sdpa`` where transformers supports it, else ``eager``).
        moe: the family routes tokens to experts.
    """

    name: str
    config: str
    model: str
    features: str
    overrides: dict[str, Any] = field(default_factory=dict)
    attn: str = "sdpa"
    moe: bool = False

    def build(self, seed: int = 0, layers: int = 2) -> "PreTrainedModel":
        import transformers

        # configs with their own names (GPT-2's n_embd...) map the common ones through attribute_map
        kwargs = {**_COMMON, **self.overrides, "num_hidden_layers": layers}
        cfg = getattr(transformers, self.config)(**kwargs, attn_implementation=self.attn)
        torch.manual_seed(seed)
        return _finish(getattr(transformers, self.model)(cfg), seed)


_GPT2 = {"n_inner": 128, "n_positions": 1024, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
_BLOOM = {"hidden_dropout": 0.0, "attention_dropout": 0.0}

FAMILIES: tuple[Family, ...] = (
    Family("llama", "LlamaConfig", "LlamaForCausalLM", "RMSNorm, SwiGLU, grouped-query attention, tied embeddings", {"tie_word_embeddings": True}),
    Family("mistral", "MistralConfig", "MistralForCausalLM", "LLaMA layout, sliding-window attention", {"sliding_window": 8}),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "biases on q/k/v"),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "per-head RMSNorm on q and k", {"head_dim": 16}),
    Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM", "norms after attention and MLP (post-block), RMSNorm on q and k"),
    Family("gemma", "GemmaConfig", "GemmaForCausalLM", "embeddings scaled by sqrt(d), RMSNorm scale 1 + w, GeGLU", {"head_dim": 16}),
    Family(
        "gemma2", "Gemma2Config", "Gemma2ForCausalLM", "Gemma plus post-block norms and logit soft-capping",
        {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16}, attn="eager",
    ),
    Family(
        "gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma2 layout with q/k norms",
        {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16},
    ),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", "fused qkv and gate_up projections"),
    Family("phi", "PhiConfig", "PhiForCausalLM", "parallel attention and MLP, LayerNorm, partial rotary, biases"),
    Family("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", "parallel residual, fused qkv, LayerNorm", {"hidden_dropout": 0.0, "attention_dropout": 0.0}),
    Family(
        "falcon", "FalconConfig", "FalconForCausalLM", "parallel attention and MLP, fused qkv, multi-query attention",
        {"parallel_attn": True, "multi_query": True, "bias": False, "ffn_hidden_size": 128, "hidden_dropout": 0.0, "attention_dropout": 0.0},
    ),
    Family("gpt2", "GPT2Config", "GPT2LMHeadModel", "Conv1D projections (transposed weights), learned positions, LayerNorm", _GPT2, attn="eager"),
    Family(
        "opt", "OPTConfig", "OPTForCausalLM", "LayerNorm, learned positions, biases everywhere",
        {"ffn_dim": 128, "dropout": 0.0, "attention_dropout": 0.0, "word_embed_proj_dim": 64},
    ),
    Family("bloom", "BloomConfig", "BloomForCausalLM", "ALiBi, embedding LayerNorm, fused qkv", _BLOOM, attn="eager"),
    Family("stablelm", "StableLmConfig", "StableLmForCausalLM", "LayerNorm, partial rotary, q/k/v biases", {"use_qkv_bias": True}),
    Family("cohere", "CohereConfig", "CohereForCausalLM", "parallel attention and MLP, bias-free LayerNorm, logit scale", {"logit_scale": 0.5}),
    Family(
        "granite", "GraniteConfig", "GraniteForCausalLM", "embedding, residual, attention and logit multipliers",
        {"embedding_multiplier": 4.0, "residual_multiplier": 0.5, "attention_multiplier": 0.25, "logits_scaling": 2.0},
    ),
    Family("mixtral", "MixtralConfig", "MixtralForCausalLM", "experts (4, top-2), router", {"num_local_experts": 4, "num_experts_per_tok": 2}, moe=True),
    Family(
        "qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "experts (4, top-2) plus a gated shared expert",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "decoder_sparse_step": 1},
        moe=True,
    ),
)

ZOO: dict[str, Family] = {f.name: f for f in FAMILIES}


def zoo_model(name: str, seed: int = 0, layers: int = 2) -> "PreTrainedModel":
    """The tiny model of family ``name`` (see :data:`ZOO`)."""
    return ZOO[name].build(seed, layers)


def zoo_builders() -> dict[str, Callable[..., "PreTrainedModel"]]:
    """``tiny-<family>`` -> builder, for the model loader (LLaMA and OPT keep their own tiny builders)."""
    return {f"tiny-{f.name}": partial(zoo_model, f.name) for f in FAMILIES if f.name not in ("llama", "opt")}


#: Every tiny model the loader knows by name: ``tiny-llama``, ``tiny-opt`` and one per zoo family.
ALL_TINY: dict[str, Callable[..., "PreTrainedModel"]] = {**TINY_MODELS, **zoo_builders()}
