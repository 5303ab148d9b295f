"""The one definition of what raypost serves, and the Ray Serve config file made from it.

`ServeConfig` is the typed form. `build_serve_config` turns it into the dict that `serve run
FILE`, `serve deploy FILE` and a KubeRay RayService (`serveConfigV2`) all read: one application
whose `args` are plain JSON and are parsed back into a `ServeConfig` by
`raypost.serving.app:build_app` on the cluster.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from raypost.config import RecipeError, StrictModel
from raypost.recipe import format_validation_error, read_yaml

APP_IMPORT_PATH = "raypost.serving.app:build_app"
# ServeConfig fields that belong to the Serve instance (proxy, HTTP), not to the application.
_SERVER_FIELDS = {"host", "port", "route_prefix", "name", "proxy_location"}


class ReplicaConfig(StrictModel):
    """Replica count, or an autoscaling range when max_replicas > min_replicas."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(
        16, gt=0, description="autoscaling target: in-flight requests per replica before scaling up"
    )
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica accepts at once; more wait in the proxy")

    @model_validator(mode="after")
    def _range(self) -> "ReplicaConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self

    def serve_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests}
        if self.max_replicas > max(self.min_replicas, 1):
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = max(self.min_replicas, 1)
        return options


class ServedModel(StrictModel):
    name: str = Field(description="the `model` name clients ask for")
    model: str = Field(description="model reference: checkpoint dir, .gguf, packaged:NAME or hub id")
    aliases: list[str] = Field(default_factory=list, description="more names answered by the same deployment")
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    max_model_len: int | None = Field(None, ge=16, description="context length; default: the model's own")
    dtype: str = "auto"
    default_max_tokens: int = Field(256, ge=1, description="completion length when a request gives no max_tokens")
    max_batch_size: int = Field(16, ge=1, description="transformers: concurrent requests generated as one batch")
    replicas: ReplicaConfig = Field(default_factory=ReplicaConfig)
    cpus_per_replica: float = Field(1.0, ge=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    vllm_kwargs: dict[str, Any] = Field(default_factory=dict, description="vllm: extra engine_kwargs")

    def names(self) -> list[str]:
        return [self.name, *self.aliases]


class ServeConfig(StrictModel):
    name: str = Field("raypost", description="the Serve application name")
    models: list[ServedModel] = Field(min_length=1)
    host: str = Field("127.0.0.1", description="HTTP bind address; 0.0.0.0 to accept remote clients")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = "EveryNode"
    api_key_env: str | None = Field(None, description="env var holding the API key clients must send")
    api_key: str | None = Field(None, description="the API key itself (prefer api_key_env: configs get shared)")
    cache_dir: str | None = Field(None, description="model cache for packaged/GGUF references")

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        seen: set[str] = set()
        for i, model in enumerate(self.models):
            for name in model.names():
                if name in seen:
                    raise ValueError(f"models[{i}]: duplicate model name {name!r}")
                seen.add(name)
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")
        backends = {m.backend for m in self.models}
        if {"vllm", "transformers"} <= backends:
            raise ValueError(
                "models mix backend vllm and transformers in one application: use one backend "
                "(or auto), or write two serve configs with different route_prefix"
            )
        return self

    def resolved_api_key(self) -> str | None:
        """The key clients must send, or None for an open endpoint."""
        if self.api_key_env and os.environ.get(self.api_key_env):
            return os.environ[self.api_key_env]
        return self.api_key


def build_serve_config(config: ServeConfig) -> dict[str, Any]:
    """A Ray Serve config-file dict (for `serve run`, `serve deploy` and RayService serveConfigV2)."""
    args = config.model_dump(mode="json", exclude=_SERVER_FIELDS, exclude_none=True)
    return {
        "proxy_location": config.proxy_location,
        "http_options": {"host": config.host, "port": config.port},
        "applications": [
            {
                "name": config.name,
                "route_prefix": config.route_prefix,
                "import_path": APP_IMPORT_PATH,
                "args": args,
            }
        ],
    }


def write_serve_config(config: ServeConfig, path: str | os.PathLike) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(build_serve_config(config), sort_keys=False), encoding="utf-8")
    return target


def parse_serve_config(data: dict[str, Any], source: str = "serve config") -> ServeConfig:
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as error:
        raise RecipeError(format_validation_error(source, error, set())) from None


def load_serve_config(path: str | os.PathLike) -> tuple[ServeConfig, dict[str, Any]]:
    """raypost's own serve YAML: ServeConfig fields plus an optional `recipe:` path (relative to
    the file) whose models and stages resolve `teacher`, `student` and `stage:NAME` references.
    Returns the config and the raw data (for the caller's reference resolution)."""
    data = read_yaml(path)
    recipe = data.pop("recipe", None)
    config = parse_serve_config(data, str(path))
    if recipe is not None:
        recipe_path = Path(path).parent / recipe if not Path(recipe).is_absolute() else Path(recipe)
        data["recipe"] = str(recipe_path)
    return config, data


def model_name_for(reference: str) -> str:
    """A client-facing name for a bare model reference: `packaged:smollm2` -> `smollm2`,
    `/runs/x/train/model` -> `train`."""
    if reference.startswith("packaged:"):
        return reference.split(":", 1)[1]
    path = Path(reference.rstrip("/"))
    name = path.parent.name if path.name == "model" and path.parent.name else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.removesuffix(".gguf")) or "model"
