"""Model loaders: built-in default, Hugging Face folders, GGUF files, tiny test models."""
from graphprune.models.loader import DEFAULT_MODEL, ByteTokenizer, LoadedModel, load_model, smollm2_gguf_path

__all__ = ["DEFAULT_MODEL", "ByteTokenizer", "LoadedModel", "load_model", "smollm2_gguf_path"]
