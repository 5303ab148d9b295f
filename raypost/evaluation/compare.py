"""Two evaluation runs side by side, with a paired bootstrap interval on the difference.

    print(compare("runs/q/eval/base", "runs/q/eval/student"))

A run is a directory written by `evaluate()` (summary.json + items/), or a directory holding
several (one per benchmark, as the eval stage writes them). Benchmarks present in both are
compared on the items both runs scored: per item pass@k, the mean, the delta B - A, and a 95%
interval from resampling the shared items with replacement (paired: the same draw for A and B);
where items carry subjects (MMLU subjects, testbed levels), one such row per subject too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from raypost import records
from raypost.evaluation.harness import item_pass_at_k
from raypost.records import DataError


def find_runs(path: str | Path) -> dict[str, Path]:
    """benchmark -> run directory, for a run dir or a directory of run dirs."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    found: dict[str, list[Path]] = {}
    candidates = [root / "summary.json"] + sorted(root.glob("*/summary.json")) + sorted(root.glob("*/*/summary.json"))
    for summary_path in candidates:
        if not summary_path.is_file():
            continue
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as error:
            raise DataError(f"{summary_path}: invalid JSON: {error.msg}") from None
        if isinstance(summary, dict) and "benchmark" in summary and (summary_path.parent / "items").is_dir():
            found.setdefault(summary["benchmark"], []).append(summary_path.parent)
        if summary_path == root / "summary.json" and found:
            break  # the directory is itself a run
    if not found:
        raise DataError(f"{root}: no evaluation run (summary.json + items/) here or below")
    ambiguous = {b: p for b, p in found.items() if len(p) > 1}
    if ambiguous:
        listing = "; ".join(f"{b}: {', '.join(str(x) for x in p)}" for b, p in ambiguous.items())
        raise DataError(f"{root}: several runs per benchmark ({listing}); name the run directories themselves")
    return {b: p[0] for b, p in found.items()}


def bootstrap_interval(values, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of `values` over items resampled with replacement."""
    values = np.asarray(values, dtype=float)
    index = np.random.default_rng(seed).integers(0, len(values), size=(samples, len(values)))
    low, high = np.percentile(values[index].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(b) - mean(a) over resampled items (same indices for both):
    the mean of per-item differences, resampled."""
    return bootstrap_interval(np.asarray(b, dtype=float) - np.asarray(a, dtype=float), samples, seed)


def _run_info(run: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run / "summary.json").read_text())
    return summary, records.read_rows(run / "items")


def _row(label: str, k: int, a: np.ndarray, b: np.ndarray, low: float, high: float) -> str:
    return (f"| {label} | pass@{k} | {100 * a.mean():.2f} | {100 * b.mean():.2f} | "
            f"{100 * (b.mean() - a.mean()):+.2f} | [{100 * low:+.2f}, {100 * high:+.2f}] | {len(a)} |")


def compare(run_a_dir: str | Path, run_b_dir: str | Path, *, samples: int = 2000, seed: int = 0) -> str:
    """Markdown: per benchmark and metric, A, B, B - A and its paired bootstrap 95% interval."""
    runs_a, runs_b = find_runs(run_a_dir), find_runs(run_b_dir)
    shared_benchmarks = [b for b in runs_a if b in runs_b]
    if not shared_benchmarks:
        raise DataError(f"no benchmark in common: {run_a_dir} has {sorted(runs_a)}, {run_b_dir} has {sorted(runs_b)}")
    lines = [
        "| benchmark | metric | A | B | Δ (B − A) | 95% CI (paired bootstrap) | items |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    header, notes = [], []
    for benchmark in shared_benchmarks:
        summary_a, items_a = _run_info(runs_a[benchmark])
        summary_b, items_b = _run_info(runs_b[benchmark])
        subject_of = {r["id"]: r.get("subject") or "" for r in items_a}
        if not header:
            header = [f"A: {summary_a['model']} ({runs_a[benchmark].parent if len(runs_a) > 1 else runs_a[benchmark]})",
                      f"B: {summary_b['model']} ({runs_b[benchmark].parent if len(runs_b) > 1 else runs_b[benchmark]})"]
        ks = sorted({int(m.split("@")[1]) for m in summary_a["metrics"]} & {int(m.split("@")[1]) for m in summary_b["metrics"]})
        for k in ks:
            per_a, per_b = item_pass_at_k(items_a, k), item_pass_at_k(items_b, k)
            shared = sorted(set(per_a) & set(per_b))
            if not shared:
                notes.append(f"{benchmark}: the runs share no items")
                break
            if k == ks[0] and (len(shared) < len(per_a) or len(shared) < len(per_b)):
                notes.append(f"{benchmark}: compared on the {len(shared)} shared items "
                             f"(A has {len(per_a)}, B has {len(per_b)})")
            a = np.array([per_a[i] for i in shared])
            b = np.array([per_b[i] for i in shared])
            low, high = paired_bootstrap(a, b, samples, seed)
            lines.append(_row(benchmark, k, a, b, low, high))
            # per subject (MMLU subjects, testbed levels): the same paired interval within each
            subjects = sorted({subject_of.get(i, "") for i in shared} - {""})
            if len(subjects) > 1:
                for subject in subjects:
                    index = [n for n, i in enumerate(shared) if subject_of.get(i) == subject]
                    sub_low, sub_high = paired_bootstrap(a[index], b[index], samples, seed)
                    lines.append(_row(f"{benchmark} {subject}", k, a[index], b[index], sub_low, sub_high))
    only = sorted(set(runs_a) ^ set(runs_b))
    if only:
        notes.append(f"in one run only: {', '.join(only)}")
    return "\n".join(header + [""] + lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"
