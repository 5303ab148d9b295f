"""`raypost eval compare RUN_A RUN_B` beside the stage command `raypost eval RECIPE`.

Both share the one `eval` subcommand: its first word is either a recipe file or `compare`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    eval_parser = subparsers.choices.get("eval")
    if eval_parser is None:
        eval_parser = subparsers.add_parser("eval", help="evaluation")
        eval_parser.add_argument("recipe")
        eval_parser.add_argument("overrides", nargs="*")
    run_recipe = eval_parser.get_default("handler")
    eval_parser.usage = ("raypost eval RECIPE [a.b=value ...] [--address ADDR]\n"
                         "       raypost eval compare RUN_A RUN_B [--bootstrap-samples N] [--seed S]")
    eval_parser.description = ("Run the recipe's evaluation stages, or compare two evaluation runs "
                               "(side by side, deltas, paired bootstrap 95% interval).")
    eval_parser.add_argument("--bootstrap-samples", type=int, default=2000, help="compare: bootstrap resamples")
    eval_parser.add_argument("--seed", type=int, default=0, help="compare: bootstrap seed")

    def dispatch(args: argparse.Namespace) -> int:
        if args.recipe == "compare" and not Path("compare").is_file():
            return _compare(eval_parser, args)
        return run_recipe(args)

    eval_parser.set_defaults(handler=dispatch)


def _compare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from raypost.evaluation.compare import compare

    if len(args.overrides) != 2:
        parser.error("compare takes two run directories: raypost eval compare RUN_A RUN_B")
    print(compare(args.overrides[0], args.overrides[1], samples=args.bootstrap_samples, seed=args.seed), end="")
    return 0
