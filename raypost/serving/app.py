"""`build_app(args)`: the Serve application named by the config file's import_path.

vLLM models are served by Ray's own `ray.serve.llm` (LLMConfig + build_openai_app); everything
else by raypost's transformers deployments behind one OpenAI router. Either way the HTTP surface
is the same: /v1/models, /v1/chat/completions, /v1/completions, a health route.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ray import serve

from raypost.serving.config import ServeConfig, ServedModel, parse_serve_config

# The HTTP ingress only parses and forwards: it must not take a CPU a model replica needs.
_INGRESS_OPTIONS = {"ray_actor_options": {"num_cpus": 0}}


def build_app(args: dict[str, Any]) -> serve.Application:
    config = args if isinstance(args, ServeConfig) else parse_serve_config(dict(args), "serve application args")
    if serving_backend(config) == "vllm":
        return build_vllm_app(config)
    return build_transformers_app(config)


def serving_backend(config: ServeConfig) -> str:
    """One backend per application; `auto` is vLLM where it is installed (decided on the cluster)."""
    chosen = {m.backend for m in config.models} - {"auto"}
    if chosen:
        return chosen.pop()
    from raypost.engines.vllm_engine import vllm_available

    return "vllm" if vllm_available() else "transformers"


def _deployment_name(name: str) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def _actor_options(model: ServedModel) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": model.cpus_per_replica}
    if model.gpus_per_replica:
        options["num_gpus"] = model.gpus_per_replica
    return options


def build_transformers_app(config: ServeConfig) -> serve.Application:
    from raypost.serving.router import OpenAIRouter
    from raypost.serving.transformers_server import TransformersModelServer

    handles: dict[str, Any] = {}
    for model in config.models:
        deployment = TransformersModelServer.options(
            name=_deployment_name(model.name),
            ray_actor_options=_actor_options(model),
            **model.replicas.serve_options(),
        ).bind(
            model.model,
            max_model_len=model.max_model_len,
            dtype=model.dtype,
            cache_dir=config.cache_dir,
            max_batch_size=model.max_batch_size,
            default_max_tokens=model.default_max_tokens,
        )
        for name in model.names():
            handles[name] = deployment
    # The key as the building process sees it, for replicas whose environment lacks the variable.
    return OpenAIRouter.bind(models=handles, api_key=config.resolved_api_key(), api_key_env=config.api_key_env)


def llm_configs(config: ServeConfig) -> list[Any]:
    """One `ray.serve.llm.LLMConfig` per served name (an alias is a second copy on vLLM)."""
    from ray.serve.llm import LLMConfig

    from raypost.config import EngineConfig
    from raypost.engines.vllm_engine import vllm_engine_kwargs, vllm_env
    from raypost.models import resolve_model

    result = []
    for model in config.models:
        # the replica's environment is the raylet's: pass the KV-cache default and the caller's VLLM_*
        env = vllm_env(on_gpu=bool(model.gpus_per_replica))
        source = str(resolve_model(model.model, config.cache_dir))
        engine = EngineConfig(backend="vllm", max_model_len=model.max_model_len, dtype=model.dtype, vllm_kwargs=model.vllm_kwargs)
        engine_kwargs = vllm_engine_kwargs(engine, int(model.vllm_kwargs.get("tensor_parallel_size", 1)),
                                           on_gpu=bool(model.gpus_per_replica))
        # Engine metrics are off (log_engine_metrics=False), so the per-step stats vLLM's async
        # engine keeps by default would only feed a log line; LLM.generate skips them too.
        engine_kwargs.setdefault("disable_log_stats", True)
        deployment_config = model.replicas.serve_options()
        extra: dict[str, Any] = {}
        if not model.gpus_per_replica:
            # Without a CPU-only bundle ray.serve.llm asks for a GPU per engine worker. The
            # replica actor itself only relays to the engine: its default 1 CPU would be added to
            # the bundle, so a "1 CPU" model would hold 2.
            extra["placement_group_config"] = {"bundles": [{"CPU": model.cpus_per_replica or 1}]}
            deployment_config["ray_actor_options"] = {"num_cpus": 0}
        for name in model.names():
            result.append(
                LLMConfig(
                    model_loading_config={"model_id": name, "model_source": source},
                    engine_kwargs=engine_kwargs,
                    deployment_config=dict(deployment_config),
                    runtime_env={"env_vars": env} if env else None,
                    log_engine_metrics=False,
                    **extra,
                )
            )
    return result


def build_vllm_app(config: ServeConfig) -> serve.Application:
    from ray.serve.llm import build_openai_app

    configs = llm_configs(config)
    if not (config.api_key or config.api_key_env):
        return build_openai_app({"llm_configs": configs, "ingress_deployment_config": _INGRESS_OPTIONS})
    return _openai_app_with_key(configs, config.resolved_api_key(), config.api_key_env)


def _openai_app_with_key(configs: list[Any], api_key: str | None, api_key_env: str | None) -> serve.Application:
    """build_openai_app's own wiring, with raypost's API-key middleware on its FastAPI app:
    ray.serve.llm has no API-key option, and its ingress app is frozen once built."""
    from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, init, make_fastapi_ingress
    from ray.llm._internal.serve.core.server.builder import build_llm_deployment

    from raypost.serving.auth import APIKeyMiddleware

    deployments = {c.model_id: build_llm_deployment(c) for c in configs}
    cards = {c.model_id: to_model_metadata(c.model_id, c) for c in configs}
    fastapi_app = init()
    fastapi_app.add_middleware(APIKeyMiddleware, api_key=api_key, api_key_env=api_key_env)
    ingress_cls = make_fastapi_ingress(OpenAiIngress, app=fastapi_app)
    options = maybe_apply_llm_deployment_config_defaults(OpenAiIngress.get_deployment_options(configs), _INGRESS_OPTIONS)
    return serve.deployment(ingress_cls, **options).bind(llm_deployments=deployments, model_cards=cards, lora_paths={})
