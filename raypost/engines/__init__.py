"""Engines: one interface (`Engine`), several backends. Build one with `build_engine`."""

from __future__ import annotations

from raypost.config import EngineConfig
from raypost.engines.base import Completion, Engine, Request, TokenLogprob, generate_each, row_error


def pick_backend(config: EngineConfig) -> str:
    """`auto` means vLLM where it is installed, transformers otherwise."""
    if config.backend != "auto":
        return config.backend
    from raypost.engines.vllm_engine import vllm_available

    return "vllm" if vllm_available() else "transformers"


def build_engine(model: str, config: EngineConfig, cache_dir: str | None = None, tensor_parallel_size: int = 1) -> Engine:
    """An engine for a model reference. `model` is a reference (see raypost.models) or, for
    the openai backend, the remote model name."""
    backend = pick_backend(config)
    if backend == "openai":
        from raypost.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(model, config)
    if backend == "reference":
        from raypost.engines.reference_engine import ReferenceEngine

        return ReferenceEngine(model)
    if backend == "procedural":
        from raypost.engines.procedural_engine import ProceduralEngine

        return ProceduralEngine(model, config, cache_dir)
    from raypost.models import resolve_model

    path = resolve_model(model, cache_dir)
    if backend == "vllm":
        from raypost.engines.vllm_engine import VLLMEngine

        return VLLMEngine(str(path), config, model_name=model, tensor_parallel_size=tensor_parallel_size)
    from raypost.engines.transformers_engine import TransformersEngine

    return TransformersEngine(str(path), config, model_name=model)


__all__ = ["Completion", "Engine", "EngineConfig", "Request", "TokenLogprob", "build_engine", "generate_each",
           "pick_backend", "row_error"]
