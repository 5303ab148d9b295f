"""What every lab script shares (bench/lab_*.py): arguments, seeded runs of a recipe, paired
contrasts over (seed, item) units with a verdict, and matplotlib figures.

A lab tests a seed paper's claim on the testbed. Its verdict per contrast is "held" when the
bootstrap 95% interval of the difference lies above zero, "not held" when below, else
"inconclusive"; nothing is tuned against the held-out items.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from raypost.evaluation.compare import paired_bootstrap  # noqa: E402


def arguments(description: str, recipe: str, output_root: str, plot: str, overrides: bool = False, extra=None):
    """The common options; `extra(parser)` adds a lab's own."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    if extra is not None:
        extra(parser)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "lab" / recipe))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--output-root", default=str(REPO / "runs" / output_root))
    parser.add_argument("--plot", default=str(REPO / "docs" / plot))
    if overrides:
        parser.add_argument("overrides", nargs="*", help="recipe overrides for every run")
    return parser.parse_args()


def verdict(low: float, high: float) -> str:
    return "held" if low > 0 else "not held" if high < 0 else "inconclusive"


def contrast(a, b) -> dict:
    """mean(b) - mean(a) over the same units, its paired bootstrap 95% interval and the verdict."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    low, high = paired_bootstrap(a, b)
    return {"diff": round(float(b.mean() - a.mean()), 4), "ci95": [round(low, 4), round(high, 4)],
            "verdict": verdict(low, high)}


def run_recipe(recipe: Path, seed: int, overrides: list[str]) -> float:
    """`raypost run RECIPE overrides` (its own local Ray); the lab stops if it fails."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "raypost", "run", str(recipe), *overrides], cwd=REPO)
    if result.returncode != 0:
        print(json.dumps({"error": f"seed {seed}: raypost run exited {result.returncode}"}))
        sys.exit(1)
    return time.perf_counter() - started


def per_item(eval_dir: Path, label: str) -> tuple[dict[str, float], dict[str, str]]:
    """An eval stage's pass@1 per item of one model, and each item's subject (the testbed's level)."""
    from raypost import records
    from raypost.evaluation.harness import item_pass_at_k

    rows = records.read_rows(eval_dir / label / "arith" / "items")
    return item_pass_at_k(rows, 1), {r["id"]: str(r.get("subject") or "") for r in rows}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, path: Path) -> None:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot().close(figure)


def finish(out: dict, root: Path, plot_file: str, started: float, plot) -> None:
    """The lab's closing: its wall time, the plot, the overlay report's path, and the JSON line."""
    out["lab_seconds"] = round(time.perf_counter() - started, 1)
    plot(Path(plot_file), out)
    out["plot"] = plot_file
    out["report"] = str(root / "report" / "index.html")
    print(json.dumps(out))
