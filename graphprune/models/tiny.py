"""Tiny randomly initialised causal LMs (the built-in ``tiny-llama`` and ``tiny-opt``) built from configs in code (no files, no downloads).

* :func:`tiny_llama` -- LLaMA family: RMSNorm, SwiGLU MLP, grouped-query attention, RoPE,
  tied embeddings (like the default SmolLM2 model).
* :func:`tiny_opt` -- LayerNorm family: OPT with biases on every Linear, learned
  positions, ReLU MLP, untied LM head.

Widths are multiples of 8 so every N:M pattern with M in {4, 8} applies.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:  # transformers is imported when a tiny model is built, not with this module
    from transformers import LlamaForCausalLM, OPTForCausalLM, PreTrainedModel

TINY_VOCAB = 256
#: PyTorch's fused attention (a config keyword that transformers' type stubs do not declare)
SDPA: dict[str, Any] = {"attn_implementation": "sdpa"}


def _finish(model: "PreTrainedModel", seed: int) -> "PreTrainedModel":
    # Re-initialise with a fixed generator so tests are deterministic whatever ran before,
    # and give norm scales non-trivial values so folding them is actually tested.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval().float()


def tiny_llama(seed: int = 0, layers: int = 2, tie: bool = True) -> "LlamaForCausalLM":
    """A 2-layer LLaMA: hidden 64, 4 heads / 2 KV heads, MLP 128, vocab 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        **SDPA,
    )
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(cfg), seed)  # type: ignore[return-value]


def tiny_opt(seed: int = 0, layers: int = 2) -> "OPTForCausalLM":
    """A 2-layer OPT: hidden 64, 4 heads, FFN 128, vocab 256, LayerNorm before each block."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=1024,
        word_embed_proj_dim=64,
        do_layer_norm_before=True,
        tie_word_embeddings=False,
        dropout=0.0,
        attention_dropout=0.0,
        **SDPA,
    )
    torch.manual_seed(seed)
    return _finish(OPTForCausalLM(cfg), seed)  # type: ignore[return-value]


TINY_MODELS: dict[str, Callable[..., "PreTrainedModel"]] = {"tiny-llama": tiny_llama, "tiny-opt": tiny_opt}


def random_tokens(batch: int = 2, seq: int = 16, seed: int = 0, vocab: int = TINY_VOCAB) -> torch.Tensor:
    """Deterministic random token ids ``[batch, seq]``."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
