"""`raypost data synth FAMILY --n N --levels 1-4 --seed S -o FILE`: a procedural data set.

Writes GSM8K-format JSONL (`question`, `answer` ending `#### N`) plus `id`, `level` and
`family`. Questions of the shipped held-out test set (data/arith/test.jsonl) are never drawn
into a new set unless --allow-test-overlap is given, so train and test never share a question.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from raypost.records import DataError

REPO = Path(__file__).resolve().parents[2]
HELD_OUT = {"arith": REPO / "data" / "arith" / "test.jsonl"}


def register(sub) -> None:
    data = sub.add_parser("data", help="make data sets", description="Make data sets.")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="a procedural task data set (GSM8K-format JSONL)",
                                description="Write a seeded procedural data set with exact step-by-step solutions.")
    synth.add_argument("family", help="task family: arith")
    synth.add_argument("--n", type=int, required=True, help="number of items")
    synth.add_argument("--levels", default="1-4", help="difficulty levels, e.g. 1-4 or 1,3 (default 1-4)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--distractors", type=float, default=0.3,
                       help="expected irrelevant sentences per problem (default 0.3)")
    synth.add_argument("-o", "--output", required=True, help="JSONL file to write")
    synth.add_argument("--exclude", action="append", default=[], help="JSONL files whose questions to avoid")
    synth.add_argument("--allow-test-overlap", action="store_true",
                       help="do not exclude the shipped held-out test questions")
    synth.set_defaults(handler=_synth)


def synth_items(family: str, n: int, levels: str, seed: int, distractors: float = 0.3,
                exclude: list[str] | tuple[str, ...] = (), allow_test_overlap: bool = False):
    from raypost.tasks import arith

    if family != "arith":
        raise DataError(f"data synth: unknown task family {family!r}; known: arith")
    if n < 1:
        raise DataError(f"data synth: --n must be at least 1, got {n}")
    if distractors < 0:
        raise DataError(f"data synth: --distractors must be >= 0, got {distractors}")
    try:
        level_list = arith.parse_levels(levels)
    except ValueError as error:
        raise DataError(f"data synth: --{error}") from None
    paths = [Path(p) for p in exclude] + ([] if allow_test_overlap else [HELD_OUT[family]])
    avoid: set[str] = set()
    for path in paths:
        if not path.is_file():
            raise DataError(f"data synth: --exclude {path}: no such file")
        avoid.update(arith.read_questions(path))
    try:
        return arith.synthesize(n, level_list, seed, distractors=distractors, exclude=avoid)
    except ValueError as error:
        raise DataError(f"data synth: {error}") from None


def _synth(args: argparse.Namespace) -> int:
    from collections import Counter

    from raypost.tasks import arith

    items = synth_items(args.family, args.n, args.levels, args.seed, args.distractors, args.exclude,
                        args.allow_test_overlap)
    path = arith.write_jsonl(items, args.output)
    levels = Counter(i.level for i in items)
    print(f"data synth {args.family}: {len(items)} items -> {path} "
          f"(levels {', '.join(f'{k}: {v}' for k, v in sorted(levels.items()))}; seed {args.seed})")
    return 0
