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


@pytest.mark.slow
def test_the_cached_default_model_is_the_gguf_model(tmp_path, monkeypatch, caplog) -> None:
    """The built-in model's first load converts its GGUF file and caches the folder; a later
    load reads that folder and gets the same weights, tokenizer and logits. A broken cache is
    converted again and an unwritable one is skipped, each with a warning."""
    from graphprune.data import load_texts
    from graphprune.models import loader

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(loader.NO_MODEL_CACHE_ENV, raising=False)
    first = load_model("smollm2-135m")  # from the GGUF file (no cache yet), and cached
    folder = loader.default_model_cache(loader.smollm2_gguf_path())
    assert folder.parent == tmp_path / "cache" / "graphprune" / "models"
    assert (folder / "config.json").is_file() and [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging left
    again = load_model("smollm2-135m")
    assert (again.name, again.source) == ("smollm2-135m", "builtin") and again.model is not first.model
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.model.lm_head.weight.data_ptr() == again.model.model.embed_tokens.weight.data_ptr()  # still tied
    for text in load_texts(["pydoc", "news"]):
        assert again.tokenizer.encode(text.text) == first.tokenizer.encode(text.text)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template"):
        assert getattr(again.tokenizer, attr) == getattr(first.tokenizer, attr)
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again.model(input_ids=ids).logits, first.model(input_ids=ids).logits)

    (folder / "model.safetensors").unlink()  # a broken cache: converted again
    monkeypatch.setattr(loader, "_load_gguf", lambda *args: first)  # (without another 30-s conversion)
    assert load_model("smollm2-135m") is first
    assert "does not load" in caplog.text and (folder / "model.safetensors").is_file()

    (tmp_path / "not-a-dir").write_text("")  # an unwritable cache: skipped with a warning
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
    assert load_model("smollm2-135m") is first
    assert "could not cache the built-in model" in caplog.text


@pytest.mark.slow
def test_lazy_loading_reads_the_built_in_model_from_its_cached_folder(monkeypatch) -> None:
    from graphprune.models import loader
    from graphprune.models.lazy import load_lazy

    monkeypatch.delenv(loader.NO_MODEL_CACHE_ENV, raising=False)
    skeleton, source = load_lazy("smollm2-135m")  # converts first when the cache is empty
    assert (skeleton.name, skeleton.source) == ("smollm2-135m", "hf-lazy")
    assert all(p.is_meta for p in skeleton.model.parameters())
    names = {n for n, _ in skeleton.model.named_parameters()}
    # 9 tensors per block (7 Linears, 2 norms), the embedding table (the head is tied to it), the final norm
    assert names <= source.names() and len(names) == 30 * 9 + 2
    monkeypatch.setenv(loader.NO_MODEL_CACHE_ENV, "1")
    with pytest.raises(ModelLoadError, match="graphprune convert --model smollm2-135m"):
        load_lazy("smollm2-135m")
