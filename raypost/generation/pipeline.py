"""Teacher generation on Ray Data: prompt rows -> engine actors -> Parquet parts, on the workers.

    generate_files("prompts/*.jsonl", fmt, model=..., output_dir=...)   # files, read by Ray Data
    generate(rows, model=..., output_dir=...)                            # rows already in memory

The driver plans and counts; the workers read and validate the input, expand samples, subtract
what an earlier run committed (a left-anti join on Ray Data), check the context length, run
the engines and commit every finished batch as one Parquet part named by its keys. A crash, a
Ctrl-C or a lost node loses at most the batches in flight, and every (id, sample) lands exactly
once. Bad rows go to `<output_dir>/rejected/` with their location and reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raypost import records, schema
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.engines import pick_backend
from raypost.generation import batches, faults, sources


MIN_STEADY_SECONDS = 1.0
LIGHT_CPUS = batches.LIGHT_CPUS
BROADCAST_KEYS = 200_000


@dataclass
class GenerationSummary:
    output_dir: str
    rejected_dir: str
    rows_written: int = 0          # this run
    rows_skipped: int = 0          # already present from an earlier run
    rows_total: int = 0            # in the output after this run
    rows_rejected: int = 0         # this run
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0   # until the first batch came back: engine load, warm-up
    tokens_per_second: float = 0.0  # completion tokens / whole wall time, start-up included
    # completion tokens after the first batch / time after it: the engine's steady rate. None
    # when the batches came back too close together to time (e.g. all in flight at once).
    steady_tokens_per_second: float | None = None
    engine: str = ""
    model: str = ""
    reject_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"generate: {self.rows_written} rows done ({self.rows_skipped} already there, "
            f"{self.rows_total} in output), {self.rows_rejected} rejected, "
            f"{self.tokens_per_second:.1f} tok/s overall"
            + (f", {self.steady_tokens_per_second:.1f} tok/s steady" if self.steady_tokens_per_second else "")
            + f", first batch after {self.startup_seconds:.1f}s "
            f"[{self.engine}] -> {self.output_dir}"
        )


def model_context_length(model_path: Path, engine: EngineConfig) -> int:
    if engine.max_model_len:
        return engine.max_model_len
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return int(getattr(config, "max_position_embeddings", 2048))



def generate(
    prompts: Sequence[dict[str, Any]],
    *,
    model: str,
    output_dir: str | Path,
    engine: EngineConfig | None = None,
    sampling: SamplingConfig | None = None,
    resources: Resources | None = None,
    cache_dir: str | None = None,
    rejected: Sequence[records.Rejected] = (),
    source: str = "prompts",
    progress: bool | str = True,
    engine_actor: Callable[[str], Any] | None = None,
) -> GenerationSummary:
    """Generate `sampling.n` responses per prompt row (prompt schema, already in memory) into
    `output_dir`. `rejected` carries rows an earlier step already set aside, so they are stored
    with the rest. For prompt files use `generate_files`: their rows never pass through the driver.
    `engine_actor(model path)`, where given, returns a running engine actor (raypost.loop.engines)
    holding that model, to answer instead of engines started for this call; it is asked only
    when there is something to generate.
    """
    from raypost.runtime import ensure_ray

    engine = engine or EngineConfig()
    started = time.perf_counter()
    rejected_dir = Path(output_dir) / "rejected"
    batches.reject(str(rejected_dir), [
        {schema.ID: r.id, "row": json.dumps(r.row, default=str, ensure_ascii=False), "source": r.source, "reason": r.reason}
        for r in rejected
    ])
    table = pa.Table.from_pylist([
        {schema.ID: row[schema.ID], schema.MESSAGES: row[schema.MESSAGES], schema.REFERENCE: row.get(schema.REFERENCE),
         "order": i, "location": f"{source}:{i}", "raw": None, "error": None}
        for i, row in enumerate(prompts)
    ], schema=sources.READ_SCHEMA)
    ensure_ray()
    import ray

    # blocks of one engine batch, so that every actor of the pool gets work
    step = max(1, engine.batch_size)
    dataset = ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)] or [table])
    return _run(dataset, {}, model=model, output_dir=Path(output_dir), engine=engine, sampling=sampling,
                resources=resources, cache_dir=cache_dir, source=source, progress=progress, started=started,
                total=table.num_rows * (sampling or SamplingConfig()).n, engine_actor=engine_actor)


def generate_files(
    inputs: str | Sequence[str],
    fmt: records.PromptFormat,
    *,
    model: str,
    output_dir: str | Path,
    engine: EngineConfig | None = None,
    sampling: SamplingConfig | None = None,
    resources: Resources | None = None,
    cache_dir: str | None = None,
    limit: int | None = None,
    progress: bool | str = True,
    engine_actor: Callable[[str], Any] | None = None,
) -> GenerationSummary:
    """Generate from prompt files (paths, globs, directories or URIs) read by Ray Data on the
    workers. Bad inputs (a missing path, a pattern that matches nothing, an uninstalled
    filesystem, a Parquet file without the prompt column) stop here, before any actor starts.
    `engine_actor`: as for `generate`."""
    from raypost.runtime import ensure_ray

    started = time.perf_counter()
    files = sources.resolve_inputs(list(inputs) if not isinstance(inputs, str) else inputs)
    rows = sources.check_schemas(files, fmt)
    if rows is not None and limit is not None:
        rows = min(rows, limit)
    ensure_ray()
    from ray.data import DataContext

    context = DataContext.get_current()
    keep_order = context.execution_options.preserve_order
    try:
        engine = engine or EngineConfig()
        rows_per_block = min(sources.ROWS_PER_BLOCK, engine.batch_size * sources.BATCHES_PER_BLOCK)
        dataset = sources.read_prompts(files, fmt, rows_per_block)
        if limit is not None:
            # "the first N rows" must be the same N rows in the duplicate pass, the run and a rerun
            context.execution_options.preserve_order = True
            dataset = dataset.limit(limit)
        duplicates = find_duplicates(dataset)
        return _run(dataset, duplicates, model=model, output_dir=Path(output_dir), engine=engine,
                    sampling=sampling, resources=resources, cache_dir=cache_dir, source=files.uri, progress=progress,
                    started=started, total=None if rows is None else rows * (sampling or SamplingConfig()).n,
                    engine_actor=engine_actor)
    finally:
        context.execution_options.preserve_order = keep_order


def find_duplicates(dataset) -> dict[str, int]:
    """{id: order of its first occurrence} for the ids that occur more than once.

    Bounded memory, not a shuffle (a Ray Data groupby cost ~15 s per 100k rows on 2 cores):
    the read tasks reduce each id to a 64-bit hash (16 bytes a row with its order), one task on
    a worker finds the hashes seen twice (16 MB per million rows), and only the rows with those
    hashes come back to the driver, where a hash collision is told apart from a repeat.
    """
    import ray

    hashed = dataset.map_batches(batches.id_hashes, batch_format="pyarrow", batch_size=None, num_cpus=LIGHT_CPUS)
    repeated = ray.get(ray.remote(_repeated_hashes).options(num_cpus=LIGHT_CPUS).remote(*hashed.to_arrow_refs()))
    if not repeated:
        return {}
    rows = dataset.map_batches(batches.rows_with_hashes, batch_format="pyarrow", batch_size=None, num_cpus=LIGHT_CPUS,
                               fn_kwargs=dict(hashes=repeated)).take_all()
    first: dict[str, int] = {}
    seen: dict[str, int] = {}
    for row in rows:
        seen[row[schema.ID]] = seen.get(row[schema.ID], 0) + 1
        first[row[schema.ID]] = min(first.get(row[schema.ID], row["order"]), row["order"])
    return {i: first[i] for i, count in seen.items() if count > 1}


def _repeated_hashes(*tables: pa.Table) -> list[int]:
    if not tables:
        return []
    table = pa.concat_tables(tables)
    counts = table.group_by("hash").aggregate([("hash", "count")])
    return counts.filter(pc.greater(counts["hash_count"], 1))["hash"].to_pylist()


def _run(dataset, duplicates: dict[str, int], *, model: str, output_dir: Path, engine: EngineConfig,
         sampling: SamplingConfig | None, resources: Resources | None, cache_dir: str | None, source: str,
         progress: bool | str, started: float, total: int | None,
         engine_actor: Callable[[str], Any] | None = None) -> GenerationSummary:
    started_wall = time.time() - (time.perf_counter() - started)
    import ray

    sampling = sampling or SamplingConfig()
    resources = resources or Resources()
    rejected_dir = output_dir / "rejected"
    backend = pick_backend(engine)
    summary = GenerationSummary(str(output_dir), str(rejected_dir), engine=backend, model=model)
    done_parts = records.part_files(output_dir)
    summary.rows_skipped = sum(pq.ParquetFile(p).metadata.num_rows for p in done_parts)
    if total is not None:  # the bar counts this run's rows
        total = max(0, total - summary.rows_skipped)

    light = dict(batch_format="pyarrow", zero_copy_batch=True, num_cpus=LIGHT_CPUS)
    todo = dataset.map_batches(batches.split_prompts, batch_size=None, **light, fn_kwargs=dict(
        rejected_dir=str(rejected_dir), duplicates=duplicates, n=sampling.n, need_reference=backend == "reference"))
    if done_parts:
        # What an earlier run committed is subtracted on the workers, never in a driver-side set:
        # up to BROADCAST_KEYS keys each worker reads them from the parts (a broadcast join, no
        # shuffle); above that a hash join partitions both sides across the cluster.
        if summary.rows_skipped <= BROADCAST_KEYS:
            todo = todo.map_batches(batches.drop_done, batch_size=None, **light,
                                    fn_kwargs=dict(done_parts=tuple(str(p) for p in done_parts)))
        else:
            done = ray.data.read_parquet([str(p) for p in done_parts], columns=[schema.ID, schema.SAMPLE_INDEX])
            todo = todo.join(done, join_type="left_anti", on=(schema.ID, schema.SAMPLE_INDEX),
                             num_partitions=max(1, min(64, summary.rows_skipped // BROADCAST_KEYS + 1)))
        # with nothing left to do, start no engine (the rows wait in the object store, not here)
        todo = todo.materialize()
        if todo.count() == 0:
            return _finish(summary, started, started_wall)

    model_path = context_check = None
    if backend in ("vllm", "transformers"):
        from raypost.models import resolve_model

        model_path = resolve_model(model, cache_dir)
        context_check = dict(model_path=str(model_path), max_model_len=model_context_length(model_path, engine))
    output = dict(output_dir=str(output_dir), rejected_dir=str(rejected_dir), source=source)
    if engine_actor is not None:
        from raypost.generation.actors import on_engine_actor

        actor = engine_actor(model if model_path is None else str(model_path))
        stats = todo.map_batches(on_engine_actor, batch_size=engine.batch_size, **light, fn_kwargs=dict(
            actor=actor, backend=backend, sampling=sampling.model_dump(), model_label=model, **output,
            context_check=context_check))
        _drain(stats, total, summary, progress, started)
    elif backend == "vllm":
        from raypost.engines.shm_cleanup import removing_orphaned_segments
        from raypost.generation.vllm_stage import vllm_generation_stage

        # Ray kills the engine actors; their vLLM message-queue segments would stay in /dev/shm.
        with removing_orphaned_segments(wait_seconds=15.0):
            todo = todo.map_batches(batches.PromptRenderer, batch_size=None, batch_format="pyarrow",
                                    compute=ray.data.ActorPoolStrategy(size=1), num_cpus=LIGHT_CPUS,
                                    fn_constructor_kwargs=dict(**context_check, rejected_dir=str(rejected_dir), source=source))
            generated = vllm_generation_stage(todo, model_path, model, engine, sampling, resources)
            stats = generated.map_batches(_write_vllm_outputs, batch_size=None, **light, fn_kwargs=output)
            _drain(stats, total, summary, progress, started)
    else:
        from raypost.generation.actors import EngineActor

        stats = todo.map_batches(
            EngineActor,
            fn_constructor_kwargs=dict(
                model=model if model_path is None else str(model_path), engine_config=engine.model_dump(),
                sampling=sampling.model_dump(), cache_dir=cache_dir, model_label=model, **output,
                fault=faults.WorkerFault.spec(output_dir), context_check=context_check),
            batch_size=engine.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
            num_cpus=resources.cpus_per_actor, num_gpus=resources.gpus_per_actor,
        )
        _drain(stats, total, summary, progress, started)
    return _finish(summary, started, started_wall)


def _write_vllm_outputs(table: pa.Table, **output) -> pa.Table:
    # ray.data.llm hands some columns back as pickled Python objects (Ray's object extension
    # type): through Python rows, not an Arrow cast
    rows = table.select([f.name for f in batches.GENERATED_SCHEMA]).to_pylist()
    return batches.write_outputs(pa.Table.from_pylist(_plain(rows), schema=batches.GENERATED_SCHEMA), **output)


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _finish(summary: GenerationSummary, started: float, started_wall: float) -> GenerationSummary:
    summary.seconds = time.perf_counter() - started
    summary.rows_total = records.count_rows(summary.output_dir)
    # every worker commits its rejected rows as parts of their own; those this run committed
    # (a rerun recommits the same parts under the same names) are this run's rejected rows
    for part in records.part_files(summary.rejected_dir):
        if part.stat().st_mtime >= started_wall:
            reasons = pq.read_table(part, columns=["reason"]).column("reason").to_pylist()
            summary.rows_rejected += len(reasons)
            for reason in reasons:
                key = (reason or "").split(":")[0][:80]
                summary.reject_reasons[key] = summary.reject_reasons.get(key, 0) + 1
    return summary


def _drain(stats, total: int | None, summary: GenerationSummary, progress: bool | str, started: float) -> None:
    """Counts from the workers, one small row per committed part: the rows themselves stay there.
    `progress`: False, True (a bar labelled `generate`) or the bar's label."""
    from raypost import console, metrics

    metrics.named(stats, "generate", summary.output_dir)

    label = progress if isinstance(progress, str) else "generate"

    done = 0
    first_batch_at = None
    tokens_after_first = 0
    for part in stats.iter_rows():
        summary.rows_written += part["rows"]
        summary.prompt_tokens += part["prompt_tokens"]
        summary.completion_tokens += part["completion_tokens"]
        now = time.perf_counter()
        if first_batch_at is None:
            first_batch_at = now
            summary.startup_seconds = now - started
        else:
            tokens_after_first += part["completion_tokens"]
            if now - first_batch_at >= MIN_STEADY_SECONDS:
                summary.steady_tokens_per_second = tokens_after_first / (now - first_batch_at)
        summary.tokens_per_second = summary.completion_tokens / max(now - started, 1e-9)
        done += part["rows"] + part["rejected"]
        if progress:
            console.progress(label, done, total, f"{summary.tokens_per_second:.0f} tok/s")
    console.progress_end(label)
