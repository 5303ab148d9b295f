"""`raypost` command line: a thin layer over the library functions.

    raypost run RECIPE [a.b=value ...]        every stage of the recipe, in order
    raypost generate|curate|train|merge|eval RECIPE [overrides]   only the stages of that kind
    raypost models list | prepare NAME
    raypost eval compare RUN_A RUN_B, raypost serve ...  (registered by their packages)
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from raypost.config import RecipeError
from raypost.errors import StageError
from raypost.models.resolve import ModelError
from raypost.recipe import load_recipe
from raypost.records import DataError

# Stage kinds that get a `raypost KIND RECIPE` command running only those stages.
STAGE_COMMANDS = {
    "generate": "run the recipe's generate stages (teacher generation on Ray Data)",
    "curate": "run the recipe's data-construction stages",
    "train": "run the recipe's training stages on Ray Train",
    "merge": "run the recipe's weight-merge stages",
    "eval": "run the recipe's evaluation stages",
}

# Packages that add commands of their own: each module has `register(subparsers)`.
EXTRA_COMMAND_MODULES: list[str] = ["raypost.evaluation.cli", "raypost.serving.cli", "raypost.tasks.cli",
                                     "raypost.loop.cli"]


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="a.b=value", help="override recipe fields")
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print which stages would run and why (changed settings or inputs), run nothing")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray, vLLM, Transformers and TRL output live (default: in <output_dir>/logs/driver.log)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypost", description="Post-train small language models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run every stage of a recipe", description="Run every stage of a recipe in order.")
    _add_recipe_arguments(run)
    run.set_defaults(handler=_run_recipe, only=None)

    for kind, text in STAGE_COMMANDS.items():
        command = sub.add_parser(kind, help=text, description=text.capitalize() + ".")
        _add_recipe_arguments(command)
        command.set_defaults(handler=_run_recipe, only=[kind])

    models = sub.add_parser("models", help="list or prepare packaged models", description="Packaged small models.")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="list packaged models").set_defaults(handler=_models_list)
    prepare = models_sub.add_parser("prepare", help="convert a model to a cached HF checkpoint")
    prepare.add_argument("name", help="packaged:NAME, NAME, a .gguf file or a checkpoint dir")
    prepare.add_argument("--cache-dir", default=None)
    prepare.set_defaults(handler=_models_prepare)

    for module_name in EXTRA_COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def _run_recipe(args: argparse.Namespace) -> int:
    from raypost.recipe import run_recipe
    from raypost.runtime import ensure_ray

    recipe = load_recipe(args.recipe, args.overrides)
    if not hasattr(recipe, "stages"):
        raise RecipeError(f"{args.recipe}: a loop recipe (it has `loop:`, no `stages:`): run it with "
                          f"`raypost loop {args.recipe}`")
    if args.only and not any(s.kind in args.only for s in recipe.stages):
        raise RecipeError(f"{args.recipe}: stages: no stage of kind {args.only[0]!r} in this recipe")
    if args.dry_run:
        from raypost.recipe import RunContext

        for decision in RunContext(recipe).plan(args.only):
            print(decision.line())
        return 0
    from raypost import console

    output_dir = recipe.resolved_output_dir()
    with console.quiet(output_dir / "logs" / "driver.log", args.verbose):
        if console.quiet_now():
            console.say(f"logs: {output_dir / 'logs' / 'driver.log'} (--verbose to show them here)")
        # Ray starts only when a stage has work to do: a rerun of an up-to-date recipe needs none
        summaries = run_recipe(recipe, only=args.only, before_first_run=lambda: ensure_ray(args.address))
        console.say(f"done: {len(summaries)} stage(s); summary in {output_dir / 'summary.json'}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from raypost.models.packaged import PACKAGED_MODELS, _package_dir

    for model in PACKAGED_MODELS.values():
        module = model.pip_packages[0].split("==")[0].replace("-", "_")
        installed = "installed" if _package_dir(module) else f"not installed ({model.install_hint()})"
        print(f"packaged:{model.name}\t{model.description}\t{installed}")
    return 0


def _models_prepare(args: argparse.Namespace) -> int:
    from raypost.models import resolve_model
    from raypost.models.packaged import PACKAGED_MODELS

    reference = args.name if ":" in args.name or args.name not in PACKAGED_MODELS else f"packaged:{args.name}"
    print(resolve_model(reference, args.cache_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    from raypost.runtime import interrupt_on_sigterm

    parser = build_parser()
    args = parser.parse_args(argv)
    interrupt_on_sigterm()
    try:
        return args.handler(args) or 0
    except (RecipeError, ModelError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished batches are kept; rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
