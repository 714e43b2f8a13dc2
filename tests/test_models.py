"""Model loading: sources, clear errors, and the default model's round trip through a saved folder."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from graphprune.errors import ModelLoadError
from graphprune.models import ByteTokenizer, load_model


def test_tiny_models_load_with_byte_tokenizer() -> None:
    m = load_model("tiny-llama")
    assert m.source == "tiny" and isinstance(m.tokenizer, ByteTokenizer)
    assert m.tokenizer.decode(m.tokenizer.encode("héllo")) == "héllo"
    assert next(m.model.parameters()).dtype == torch.float32 and not m.model.training


@pytest.mark.parametrize("spec, message", [("/no/such/dir", "not found"), ("tiny-gpt", "not found")])
def test_unknown_models(spec, message) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_model(spec)


def test_not_a_model(tmp_path) -> None:
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="neither a model folder nor a .gguf"):
        load_model(str(tmp_path / "x.txt"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_default_model_saves_as_plain_float32_folder(default_model, tmp_path) -> None:
    model = default_model.model
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 49152, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
