"""The `eval` recipe stage: every model on every benchmark, one run directory each.

    <stage dir>/<model label>/<benchmark>/   (see raypost.evaluation.harness)
    <stage dir>/results.md                   models side by side
    <stage dir>/compare-<a>-vs-<b>.md        first model against each other one
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from raypost import console
from raypost.evaluation.compare import compare
from raypost.evaluation.config import EvalStage
from raypost.evaluation.harness import EvalSummary, evaluate


def model_reference(entry: str, context) -> tuple[str, str]:
    """(reference, label) for one entry of `models`: `stage:<name>` is the model a train or
    merge stage exported to `<its stage dir>/model`."""
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", entry).strip("-") or "model"
    return context.model_reference(entry), label


def results_table(summaries: dict[str, dict[str, EvalSummary]]) -> str:
    """Markdown: one row per (benchmark, metric), one column per model."""
    labels = list(summaries)
    lines = ["| benchmark | metric | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    benchmarks = list(dict.fromkeys(b for per_model in summaries.values() for b in per_model))
    for benchmark in benchmarks:
        metrics = list(dict.fromkeys(m for s in summaries.values() if benchmark in s for m in s[benchmark].metrics))
        for metric in metrics:
            cells = []
            for label in labels:
                summary = summaries[label].get(benchmark)
                value = None if summary is None else summary.metrics.get(metric)
                cells.append("—" if value is None else f"{100 * value:.2f}")
            lines.append(f"| {benchmark} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_eval_stage(stage: EvalStage, context) -> dict[str, Any]:
    from raypost.evaluation.benchmarks import default_data_path, get_benchmark

    stage_dir: Path = context.stage_dir(stage.name)
    summaries: dict[str, dict[str, EvalSummary]] = {}
    for spec in stage.benchmark_specs():  # a missing default file stops the stage before any model loads
        if not spec.data_path:
            default_data_path(get_benchmark(spec.name))
    for entry in stage.models:
        reference, label = model_reference(entry, context)
        summaries[label] = {}
        for spec in stage.benchmark_specs():
            summary = evaluate(
                spec.name,
                model=reference,
                engine=stage.engine,
                output_dir=stage_dir / label / spec.name,
                data_path=spec.data_path,
                limit=spec.limit,
                seed=spec.seed,
                n=spec.n,
                k=spec.k,
                shots=spec.shots,
                sampling=spec.sampling or stage.sampling,
                resources=context.resources_for(stage),
                cache_dir=context.recipe.cache_dir,
                prompt_style=spec.prompt_style,
                method=spec.method,
                shots_path=spec.shots_path,
                split=spec.split,
                subjects=spec.subjects,
                timeout_s=spec.timeout_s,
                model_label=label,
            )
            console.say(summary.line())
            summaries[label][spec.name] = summary
    table = results_table(summaries)
    (stage_dir / "results.md").write_text(table)
    console.say(table)
    labels = list(summaries)
    for other in labels[1:]:
        text = compare(stage_dir / labels[0], stage_dir / other)
        (stage_dir / f"compare-{labels[0]}-vs-{other}.md").write_text(text)
        console.say(text)
    return {
        "results": str(stage_dir / "results.md"),
        "runs": {label: {b: s.as_dict() for b, s in per.items()} for label, per in summaries.items()},
    }
