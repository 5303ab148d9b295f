"""Run a list of curation steps over a Dataset and write the result.

    curate(dataset, steps, output_dir=...) -> summary dict

Writes `<output_dir>/part-*.parquet` (the curated rows), `<output_dir>/rejected/` (every row
a step set aside, with its reason), `<output_dir>/sft|kto|preference/` (from a write step) and
`<output_dir>/report.json` (each step's report). Rows that are malformed on arrival (no id,
no usable messages) are set aside before the first step.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from raypost import records, schema
from raypost.config import Resources
from raypost.curation import config as cfg
from raypost.curation.inputs import RAW, SOURCE, UNREADABLE
from raypost.curation.rows import LIGHT_CPUS, CurationLog, write_dataset

OUTPUT_SUBDIRS = ("rejected", "sft", "kto", "preference")


def row_problem(row: dict[str, Any]) -> str | None:
    """Why a row cannot enter curation (None when it can)."""
    if row.get(schema.ID) is None or str(row[schema.ID]).strip() == "":
        return "missing id"
    messages = row.get(schema.MESSAGES)
    if not isinstance(messages, list) or not messages:
        return "missing messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            return f"messages[{i}] is not a {{role, content}} message"
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        return "no non-empty user message"
    return None


def validate(dataset, log: CurationLog):
    """Set aside rows that no step can use; the rest pass through unchanged."""
    import pyarrow.compute as pc

    def flag(batch: pa.Table) -> pa.Table:
        # rows of input files that could not be read arrive marked (raypost.curation.inputs)
        unreadable = batch.column(UNREADABLE).to_pylist() if UNREADABLE in batch.column_names else None
        problems = [(unreadable and unreadable[i]) or row_problem(r) for i, r in enumerate(batch.to_pylist())]
        batch = batch.append_column("_problem", pa.array(problems, type=pa.string()))
        return batch.drop_columns([UNREADABLE]) if unreadable is not None else batch

    flagged = dataset.map_batches(flag, batch_format="pyarrow", num_cpus=LIGHT_CPUS).materialize()
    bad = flagged.map_batches(lambda b: b.filter(pc.is_valid(b.column("_problem"))), batch_format="pyarrow",
                              num_cpus=LIGHT_CPUS)
    rejected = log.reject_rows("input", bad, lambda row: row.pop("_problem"))
    good = flagged.map_batches(lambda b: b.filter(pc.is_null(b.column("_problem"))).drop_columns(
        [c for c in ("_problem", SOURCE, RAW) if c in b.column_names]), batch_format="pyarrow",
                               num_cpus=LIGHT_CPUS).materialize()
    log.report("input", {"rows_in": flagged.count(), "rows_rejected": rejected})
    return good


@dataclass
class StepContext:
    """What a step may ask about the run it is part of."""

    output_dir: Path
    log: CurationLog
    model_reference: Callable[[str], str]
    stage_dir: Callable[[str], Path]
    resources: Resources
    cache_dir: str | None


# `step:` name -> the function that runs it (Dataset in, Dataset out); a new step registers here.
STEP_RUNNERS: dict[str, Callable[[Any, Any, StepContext], Any]] = {}


def step_runner(name: str):
    def register(function):
        STEP_RUNNERS[name] = function
        return function
    return register


@step_runner("dedup")
def _dedup(dataset, step: cfg.DedupStep, ctx: StepContext):
    from raypost.curation.dedup import dedup

    return dedup(dataset, field=step.field, exact=step.exact, near=step.near, threshold=step.threshold,
                 num_perm=step.num_perm, shingle=step.shingle, shingle_size=step.shingle_size, log=ctx.log)


@step_runner("diversity")
def _diversity(dataset, step: cfg.DiversityStep, ctx: StepContext):
    from raypost.curation.diversity import diversify

    return diversify(dataset, budget=step.budget, n_clusters=step.n_clusters, embedder=step.embedder,
                     seed=step.seed, concurrency=ctx.resources.concurrency, log=ctx.log)


@step_runner("verify")
def _verify(dataset, step: cfg.VerifyStep, ctx: StepContext):
    from raypost.curation.accuracy import verify

    return verify(dataset, kind=step.kind, response_field=step.response_field,
                  reference_field=step.reference_field, drop_failed=step.drop_failed, log=ctx.log)


@step_runner("entropy_route")
def _entropy_route(dataset, step: cfg.EntropyRouteStep, ctx: StepContext):
    from raypost.curation.entropy import entropy_route
    from raypost.curation.sources import ResponseSource

    t = step.teacher
    teacher = ResponseSource(
        "teacher", from_=t.source,
        stage_dir=None if t.stage is None else str(ctx.stage_dir(t.stage)),
        model=ctx.model_reference(t.model) if t.source == "generate" else None,
        engine=t.engine, sampling=t.sampling, output_dir=str(ctx.output_dir / "work" / "teacher_cot"))
    return entropy_route(dataset, model=ctx.model_reference(step.model), engine=step.engine,
                         answer_prompt=step.answer_prompt, answer_max_tokens=step.answer_max_tokens,
                         low_quantile=step.low_quantile, high_quantile=step.high_quantile, teacher=teacher,
                         short_answer_template=step.short_answer_template,
                         require_verified_cot=step.require_verified_cot, resources=ctx.resources,
                         cache_dir=ctx.cache_dir, log=ctx.log, signal=step.signal, cot_max_tokens=step.cot_max_tokens)


@step_runner("select")
def _select(dataset, step: cfg.SelectStep, ctx: StepContext):
    from raypost.curation.selection import select_responses
    from raypost.curation.sources import ResponseSource

    sources = [ResponseSource(
        name=c.name, from_=c.source, stage_dir=None if c.stage is None else str(ctx.stage_dir(c.stage)),
        model=None if c.model is None else ctx.model_reference(c.model), engine=c.engine, sampling=c.sampling,
        output_dir=str(ctx.output_dir / "work" / f"candidates_{c.name}")) for c in step.candidates]
    return select_responses(dataset, candidates=sources, scorer=step.scorer,
                            scorer_model=ctx.model_reference(step.scorer_model) if step.scorer != "none" else None,
                            scorer_engine=step.scorer_engine, verify_kind=step.verify_kind,
                            resources=ctx.resources, cache_dir=ctx.cache_dir, log=ctx.log)


@step_runner("write")
def _write(dataset, step: cfg.WriteStep, ctx: StepContext):
    from raypost.curation.writers import write_training_sets

    write_training_sets(dataset, ctx.output_dir, formats=step.formats, sft_from=step.sft_from,
                        kto_from=step.kto_from, log=ctx.log)
    return dataset


def run_step(dataset, step, ctx: StepContext):
    """One configured step, Dataset in, Dataset out."""
    runner = STEP_RUNNERS.get(getattr(step, "step", None))
    if runner is None:
        raise TypeError(f"unknown curation step {step!r}; known: {', '.join(STEP_RUNNERS)}")
    return runner(dataset, step, ctx)


def clear_outputs(output_dir: Path, keep_work: bool = False) -> None:
    """A rerun recomputes the steps: drop the parts and subsets an earlier run wrote. `keep_work`:
    the model calls' outputs in `work/` stay, and generation there resumes by key (a teacher
    answer is never paid twice); only for a rerun of the same settings and inputs."""
    for part in records.part_files(output_dir):
        part.unlink()
    for sub in (*OUTPUT_SUBDIRS, *(() if keep_work else ("work",))):
        if (output_dir / sub).is_dir():
            shutil.rmtree(output_dir / sub)


def curate(dataset, steps: Sequence[Any], *, output_dir: str | Path, model_reference: Callable[[str], str] = lambda m: m,
           stage_dir: Callable[[str], Path] = Path, resources: Resources | None = None,
           cache_dir: str | None = None, rejected: Sequence[records.Rejected] = (),
           keep_work: bool = False) -> dict[str, Any]:
    """Run `steps` (configs from raypost.curation.config) over `dataset`; write rows, rejects, report.

    `rejected` carries rows the loader already set aside, so they are stored and counted too.
    `keep_work`: resume the model calls of an earlier run into the same `output_dir` (the recipe
    stage does, as a stage whose settings or inputs changed gets a fresh directory).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clear_outputs(output_dir, keep_work)
    resources = resources or Resources()
    # the rows a step sets aside are committed by the workers; the loader's and the model-call
    # steps' few decisions are written from here at the end, into the same directory
    log = CurationLog(rejected=list(rejected), rejected_dir=str(output_dir / "rejected"))
    started = time.perf_counter()
    dataset = validate(dataset, log)
    ctx = StepContext(output_dir=output_dir, log=log, model_reference=model_reference, stage_dir=stage_dir,
                      resources=resources, cache_dir=cache_dir)
    for step in steps:
        dataset = run_step(dataset, step, ctx)
    rows_out = write_dataset(dataset, output_dir)
    rejected = records.write_rejected(output_dir / "rejected", log.rejected) if log.rejected else 0
    summary = {
        "output_dir": str(output_dir),
        "rows_out": rows_out,
        "rows_rejected": rejected + sum(log.written.values()),
        "rejected_by_step": log.counts(),
        "rejected_dir": str(output_dir / "rejected"),
        "steps": log.reports,
        "seconds": round(time.perf_counter() - started, 3),
    }
    (output_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def load_rows(path: str | Path) -> tuple[Any, list[records.Rejected]]:
    """Rows for curation from a stage directory or row files (JSONL, JSON, Parquet, Arrow; paths,
    directories, globs, URIs), read on the workers (raypost.curation.inputs). Lines that cannot
    be read travel with the rows, marked, and `validate` sets them aside with their file:line,
    so the list of rows set aside on the driver that this returns beside the Dataset is empty."""
    from raypost.curation.inputs import read_input

    return read_input(path), []
