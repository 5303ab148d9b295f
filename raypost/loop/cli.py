"""`raypost loop RECIPE [a.b=value ...]` and `raypost loop report RUN... [-o DIR]`."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    loop = sub.add_parser("loop", help="run (or resume) a closed loop; `loop report RUN...` overlays runs",
                          description="Run or resume the closed loop of a loop recipe. "
                                      "`raypost loop report RUN_DIR... [-o DIR]` overlays finished runs.")
    loop.add_argument("recipe", help="loop recipe YAML, or `report`")
    loop.add_argument("rest", nargs="*", metavar="a.b=value | RUN_DIR", help="overrides (or run dirs after `report`)")
    loop.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    loop.add_argument("--verbose", action="store_true",
                        help="show Ray, vLLM, Transformers and TRL output live (default: in <output_dir>/logs/driver.log)")
    loop.add_argument("-o", "--output", default="runs/loop-report", help="report: output directory")
    loop.set_defaults(handler=_loop)
    sipf = sub.add_parser("sipf", help="run (or resume) a loop recipe in mode sipf (self-iterative process feedback)",
                          description="`raypost loop` for a recipe with loop.mode: sipf; refuses any other mode.")
    sipf.add_argument("recipe", help="loop recipe YAML (loop.mode: sipf)")
    sipf.add_argument("rest", nargs="*", metavar="a.b=value", help="overrides")
    sipf.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    sipf.add_argument("--verbose", action="store_true",
                        help="show Ray, vLLM, Transformers and TRL output live (default: in <output_dir>/logs/driver.log)")
    sipf.set_defaults(handler=_sipf)


def _loop(args: argparse.Namespace) -> int:
    if args.recipe == "report":
        from raypost.loop.report import overlay

        if not args.rest:
            from raypost.config import RecipeError

            raise RecipeError("loop report: give one or more run directories")
        print(f"report: {overlay(args.rest, args.output)}")
        return 0
    return _run(args)


def _sipf(args: argparse.Namespace) -> int:
    return _run(args, require_mode="sipf")


def _run(args: argparse.Namespace, require_mode: str | None = None) -> int:
    from raypost.config import RecipeError
    from raypost.loop.config import LoopRecipe
    from raypost.loop.controller import run_loop
    from raypost.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.rest, schema=LoopRecipe)
    if require_mode is not None and recipe.loop.mode != require_mode:
        raise RecipeError(f"{args.recipe}: loop.mode is {recipe.loop.mode!r}: run it with `raypost loop`, "
                          f"or set loop.mode: {require_mode}")
    from raypost import console

    log = recipe.resolved_output_dir() / "logs" / "driver.log"
    with console.quiet(log, args.verbose):
        if console.quiet_now():
            console.say(f"logs: {log} (--verbose to show them here)")
        run_loop(recipe, args.address)
    return 0
