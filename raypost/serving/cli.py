"""`raypost serve RECIPE_OR_MODEL...`: serve models over an OpenAI-compatible API on Ray Serve.

Each argument is a recipe (its teacher, student, extra models and every train/merge stage's
exported `<output_dir>/<stage>/model`), a serve YAML (ServeConfig fields, see
recipes/examples/serve.yaml) or a model reference. `--write-config FILE` writes the Ray Serve
config file instead (for `serve run FILE`, `serve deploy FILE`, or a RayService).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from raypost.config import RecipeError
from raypost.recipe import read_yaml
from raypost.serving.config import ServeConfig, ServedModel, load_serve_config, model_name_for, parse_serve_config

# Stage kinds whose output directory holds an exported checkpoint in `<stage dir>/model`.
MODEL_STAGE_KINDS = ("train", "merge")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve models over an OpenAI-compatible HTTP API (Ray Serve)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sources", nargs="+", metavar="RECIPE_OR_MODEL", help="recipe YAML, serve YAML or model reference")
    parser.add_argument("--name", action="append", default=[], help="served name for each bare model reference, in order")
    parser.add_argument("--app-name", default=None, help="Ray Serve application name (default: the recipe's name)")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 for remote clients)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    parser.add_argument("--backend", choices=["auto", "vllm", "transformers"], default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--cpus-per-replica", type=float, default=None)
    parser.add_argument("--gpus-per-replica", type=float, default=None)
    parser.add_argument("--api-key-env", default=None, help="env var holding the key clients must send")
    parser.add_argument("--write-config", metavar="FILE", default=None, help="write the Ray Serve config YAML and exit")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--high-throughput", action=argparse.BooleanOptionalAction, default=True,
                        help="a local Ray runs Serve's HAProxy ingress and gRPC data plane (default: on)")
    parser.set_defaults(handler=run_serve_command)


def recipe_models(recipe) -> list[ServedModel]:
    """What a recipe has to serve: its named models and each exported train/merge checkpoint."""
    named: dict[str, str] = {}
    for role in ("teacher", "student"):
        if getattr(recipe.models, role):
            named[role] = getattr(recipe.models, role)
    named.update(recipe.models.extra)
    output_dir = recipe.resolved_output_dir()
    for stage in recipe.stages:
        exported = output_dir / stage.name / "model"
        if stage.kind in MODEL_STAGE_KINDS and (exported / "config.json").exists():
            named[stage.name] = str(exported)
    return merge_same_models([ServedModel(name=name, model=ref) for name, ref in named.items()])


def merge_same_models(models: list[ServedModel]) -> list[ServedModel]:
    """Names for one checkpoint (teacher == student, say) become aliases of one deployment."""
    by_ref: dict[tuple[str, str], ServedModel] = {}
    for model in models:
        key = (model.model, model.backend)
        if key in by_ref:
            by_ref[key].aliases = [*by_ref[key].aliases, model.name, *model.aliases]
        else:
            by_ref[key] = model.model_copy()
    return list(by_ref.values())


def resolve_references(config: ServeConfig, recipe_path: str | None) -> ServeConfig:
    """`teacher`, `student`, extra names and `stage:NAME` in a serve YAML, looked up in its recipe."""
    needs_recipe = [m for m in config.models if m.model.startswith("stage:") or m.model in ("teacher", "student")]
    if not needs_recipe:
        return config
    if recipe_path is None:
        raise RecipeError(f"model {needs_recipe[0].model!r} needs a recipe: add `recipe: PATH` to the serve YAML")
    from raypost.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    models = []
    for model in config.models:
        ref = model.model
        if ref.startswith("stage:"):
            stage = ref.split(":", 1)[1]
            exported = recipe.resolved_output_dir() / stage / "model"
            if not (exported / "config.json").exists():
                raise RecipeError(f"{recipe_path}: stage {stage!r} has no exported model at {exported} (run it first)")
            ref = str(exported)
        else:
            ref = recipe.models.lookup(ref)
        models.append(model.model_copy(update={"model": ref}))
    return config.model_copy(update={"models": models})


def config_from_sources(args: argparse.Namespace) -> ServeConfig:
    models: list[ServedModel] = []
    base: dict[str, Any] = {}
    names = list(args.name)
    for source in args.sources:
        path = Path(source)
        if path.suffix in (".yaml", ".yml") and path.is_file():
            data = read_yaml(path)
            if "stages" in data:
                from raypost.recipe import load_recipe

                recipe = load_recipe(path)
                found = recipe_models(recipe)
                if not found:
                    raise RecipeError(f"{path}: nothing to serve (no models and no exported train/merge stage)")
                models.extend(found)
                base.setdefault("name", recipe.name)
                base.setdefault("cache_dir", recipe.cache_dir)
            else:
                config, raw = load_serve_config(path)
                config = resolve_references(config, raw.get("recipe"))
                models.extend(config.models)
                base = {**config.model_dump(exclude={"models"}, exclude_unset=True), **base}
        else:
            name = names.pop(0) if names else model_name_for(source)
            models.append(ServedModel(name=name, model=source))
    if names:
        raise RecipeError(f"--name {names[0]!r}: more --name options than bare model references")
    overrides = {"backend": args.backend, "max_model_len": args.max_model_len,
                 "cpus_per_replica": args.cpus_per_replica, "gpus_per_replica": args.gpus_per_replica}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        models = [m.model_copy(update=overrides) for m in models]
    data = {**{k: v for k, v in base.items() if v is not None}, "models": [m.model_dump() for m in merge_same_models(models)]}
    for key, value in (("name", args.app_name), ("host", args.host), ("port", args.port), ("api_key_env", args.api_key_env)):
        if value is not None:
            data[key] = value
    return parse_serve_config(data, "raypost serve")


def _port_in_use(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _start_failure(error: BaseException) -> str:
    """One line for a start that failed: HAProxy's own alert where it has one, not a traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    alerts = [line for line in lines if "[ALERT]" in line and "Exiting" not in line]
    return (alerts or lines or [type(error).__name__])[0]


def run_serve_command(args: argparse.Namespace) -> int:
    from raypost.errors import StageError
    from raypost.serving.config import build_serve_config, write_serve_config

    config = config_from_sources(args)
    if args.write_config:
        path = write_serve_config(config, args.write_config)
        print(f"wrote {path}: run it with `serve run {path}` or `serve deploy {path}`")
        return 0
    joins_cluster = bool(args.address or os.environ.get("RAY_ADDRESS"))
    if not joins_cluster and _port_in_use(config.host, config.port):
        raise StageError(f"raypost serve: {config.host}:{config.port} is in use (another `raypost serve`?); "
                         f"choose another --port")
    import ray
    from ray import serve

    from raypost.runtime import ensure_ray
    from raypost.serving.app import build_app

    if args.high_throughput and not joins_cluster:
        from raypost.serving.high_throughput import use_high_throughput_serve

        use_high_throughput_serve(config.host)
    ensure_ray(args.address)
    app = build_serve_config(config)["applications"][0]
    names = ", ".join(name for m in config.models for name in m.names())
    from raypost.engines.shm_cleanup import removing_orphaned_segments

    # vLLM replicas are killed, not closed: their message-queue segments would stay in /dev/shm.
    with removing_orphaned_segments(wait_seconds=10.0):
        try:
            try:
                serve.start(http_options={"host": config.host, "port": config.port})
                serve.run(build_app(app["args"]), name=app["name"], route_prefix=app["route_prefix"], blocking=False)
            except Exception as error:
                raise StageError(f"raypost serve: could not start on {config.host}:{config.port}: "
                                 f"{_start_failure(error)}") from None
            print(f"serving {names} at http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}/v1 "
                  f"(Ctrl-C to stop)", flush=True)
            _wait_for_interrupt()
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr, flush=True)
        finally:
            if joins_cluster:
                serve.shutdown()
            else:
                # The Ray is this command's alone: shutting it down stops Serve, its replicas and
                # HAProxy. serve.shutdown() first would wait 30 s for a controller that Ctrl-C
                # (sent to the whole process group) has already interrupted.
                ray.shutdown()
    return 0


def _wait_for_interrupt() -> None:
    import time

    while True:
        time.sleep(3600)
