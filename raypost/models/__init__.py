"""Model references: local HF dirs, hub ids, GGUF files and `packaged:NAME` models from PyPI."""

from raypost.models.resolve import ModelError, default_cache_dir, resolve_model

__all__ = ["ModelError", "default_cache_dir", "resolve_model"]
