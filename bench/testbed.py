"""The quickstart's learning, measured: base vs trained student on the testbed's held-out set.

    python bench/testbed.py [--recipe recipes/quickstart.yaml] [--output-dir DIR] [a.b=value ...]

Runs the recipe end to end (`raypost run`, a fresh output dir, its own local Ray), then reads the
eval stage's per-item results. `trained_minus_base_ci95` is the paired bootstrap 95% interval of
the difference in pass@1 over the same items (the items resampled, both models together), overall
and per level. `stage_seconds` is each stage's wall time as the recipe recorded it;
`quickstart_seconds` is the whole command, Ray start-up included. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raypost import records  # noqa: E402
from raypost.evaluation.compare import bootstrap_interval, paired_bootstrap  # noqa: E402
from raypost.evaluation.harness import item_pass_at_k  # noqa: E402


def per_item(run: Path) -> tuple[dict[str, float], dict[str, str]]:
    rows = records.read_rows(run / "items")
    return item_pass_at_k(rows, 1), {r["id"]: r.get("subject") or "" for r in rows}


def contrast(base: np.ndarray, trained: np.ndarray) -> dict:
    return {
        "items": len(base),
        "base_accuracy": round(float(base.mean()), 4),
        "base_accuracy_ci95": [round(x, 4) for x in bootstrap_interval(base)],
        "trained_accuracy": round(float(trained.mean()), 4),
        "trained_accuracy_ci95": [round(x, 4) for x in bootstrap_interval(trained)],
        "trained_minus_base": round(float(trained.mean() - base.mean()), 4),
        "trained_minus_base_ci95": [round(x, 4) for x in paired_bootstrap(base, trained)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "quickstart.yaml"))
    parser.add_argument("--output-dir", default=None, help="default: a fresh temporary directory")
    parser.add_argument("--eval-stage", default="eval")
    parser.add_argument("--benchmark", default="arith")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="raypost-bench-testbed-"))
    command = [sys.executable, "-m", "raypost", "run", args.recipe, f"output_dir={output_dir}", *args.overrides]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO)
    quickstart_seconds = time.perf_counter() - started
    if result.returncode != 0:
        print(json.dumps({"error": f"raypost run exited {result.returncode}", "command": command}))
        sys.exit(1)

    summary = json.loads((output_dir / "summary.json").read_text())
    stage_seconds = {name: s.get("seconds") for name, s in summary.items() if isinstance(s, dict)}
    runs = list(summary[args.eval_stage]["runs"])            # recipe order: base first, trained last
    eval_dir = output_dir / args.eval_stage
    base_items, subject_of = per_item(eval_dir / runs[0] / args.benchmark)
    trained_items, _ = per_item(eval_dir / runs[-1] / args.benchmark)
    shared = sorted(set(base_items) & set(trained_items))
    base = np.array([base_items[i] for i in shared])
    trained = np.array([trained_items[i] for i in shared])
    levels = sorted({subject_of[i] for i in shared} - {""})
    by_level = {}
    for level in levels:
        index = [n for n, i in enumerate(shared) if subject_of[i] == level]
        by_level[level] = contrast(base[index], trained[index])
    print(json.dumps({
        "recipe": str(Path(args.recipe).resolve().relative_to(REPO) if Path(args.recipe).resolve().is_relative_to(REPO)
                      else args.recipe),
        "overrides": args.overrides,
        "base_model": runs[0],
        "trained_model": runs[-1],
        **contrast(base, trained),
        "by_level": by_level,
        "stage_seconds": stage_seconds,
        "quickstart_seconds": round(quickstart_seconds, 1),
        "output_dir": str(output_dir),
    }))


if __name__ == "__main__":
    main()
