"""What every curation step shares: reading rows into Ray Data, prompt text, ordering, the log.

Each step is `Dataset -> Dataset`. Rows a step sets aside, and what it measured, go to a
`CurationLog` the caller passes in, so the function signature stays Dataset in, Dataset out
and nothing leaves the pipeline without a reason. In a pipeline run (`curate`) the log has a
`rejected_dir`: the workers commit the rows a step sets aside there themselves, and only their
count comes back to the driver; called alone, a step gathers them on the log.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa

from raypost import records, schema
from raypost.generation.batches import LIGHT_CPUS  # light row functions, as in generation


@dataclass
class CurationLog:
    """Rejected rows (with step and reason) and each step's report.

    `rejected`: rows set aside on the driver (a step's few model-call decisions, the loader's
    unreadable lines). `rejected_dir`: where `reject_rows` has the workers commit the rows of a
    whole Dataset; `written` counts them per step.
    """

    rejected: list[records.Rejected] = field(default_factory=list)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected_dir: str | None = None
    written: dict[str, int] = field(default_factory=dict)

    def reject(self, step: str, row: dict[str, Any], reason: str) -> None:
        self.rejected.append(records.Rejected(None if row.get(schema.ID) is None else str(row[schema.ID]),
                                              _without_logprobs(row), f"curate:{step}", reason))

    def reject_rows(self, step: str, dataset, reason: Callable[[dict[str, Any]], str]) -> int:
        """Set aside every row of `dataset`, each with `reason(row)` (which may pop helper
        columns off the row). With a `rejected_dir` the workers commit them (parts named by their
        keys, so a retried task rewrites its own part) and only counts come back; without one
        they are gathered here. Returns how many rows were set aside."""
        if self.rejected_dir is None:
            rows = collect(dataset).to_pylist()
            for row in rows:
                self.reject(step, row, reason(row))
            return len(rows)
        counts = dataset.map_batches(commit_rejected, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                                     fn_kwargs=dict(directory=self.rejected_dir, step=step, reason=reason))
        written = total(counts)
        self.written[step] = self.written.get(step, 0) + written
        return written

    def report(self, step: str, values: dict[str, Any]) -> None:
        key, i = step, 2
        while key in self.reports:  # the same step twice in one pipeline
            key, i = f"{step}_{i}", i + 1
        self.reports[key] = values

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = dict(self.written)
        for r in self.rejected:
            out[r.source.split(":", 1)[1]] = out.get(r.source.split(":", 1)[1], 0) + 1
        return {step: n for step, n in out.items() if n}


COUNT_SCHEMA = pa.schema([("rows", pa.int64())])


def _without_logprobs(row: dict[str, Any]) -> dict[str, Any]:
    # logprobs are bulky and say nothing about why a row was set aside
    return {k: v for k, v in row.items() if k != schema.LOGPROBS}


def _row_key(row: dict[str, Any]) -> str:
    return f"{row.get(schema.ID)}\x00{row.get(schema.SAMPLE_INDEX)}"


def commit_rejected(batch: pa.Table, *, directory: str, step: str, reason: Callable[[dict[str, Any]], str]) -> pa.Table:
    """Ray Data batch function: commit the batch's rows to `directory` as rejected rows, in the
    schema and with the source (`curate:<step>`) of every other rejected row."""
    from raypost.generation.batches import commit_part

    out, keys = [], []
    for row in batch.to_pylist():
        # the sample is part of the key: one id's samples may be set aside for the same reason
        key = _row_key(row)
        why = reason(row)
        # a row of an input file that could not be read: its location and its text as they were
        source, text = row.pop("_source", None), row.pop("_raw", None)
        out.append({"id": None if row.get(schema.ID) is None else str(row[schema.ID]),
                    "row": text or json.dumps({k: v for k, v in _without_logprobs(row).items() if v is not None}
                                              if source else _without_logprobs(row), default=str, ensure_ascii=False),
                    "source": source or f"curate:{step}", "reason": why})
        keys.append(f"curate:{step}\x00{source}\x00{key}\x00{why}\x00{len(keys)}")
    if out:
        commit_part(directory, pa.Table.from_pylist(out, schema=schema.REJECTED_SCHEMA), keys, rejected=True)
    return pa.table({"rows": [len(out)]}, schema=COUNT_SCHEMA)


def commit_rows(batch: pa.Table, *, directory: str) -> pa.Table:
    """Ray Data batch function: commit the batch as one Parquet part of `directory`, named by its
    rows' keys (id, sample), so a retried task rewrites its own part."""
    from raypost.generation.batches import commit_part

    if batch.num_rows:
        commit_part(directory, batch, part_keys(batch))
    return pa.table({"rows": [batch.num_rows]}, schema=COUNT_SCHEMA)


def part_keys(batch: pa.Table) -> list[str]:
    """One key per row of a block (id, sample, position): what names the parts written from it."""
    def column(name: str) -> list:
        return batch.column(name).to_pylist() if name in batch.column_names else [None] * batch.num_rows

    return [f"{i}\x00{s}\x00{n}" for n, (i, s) in enumerate(zip(column(schema.ID), column(schema.SAMPLE_INDEX)))]


def write_dataset(dataset, directory: str | Path) -> int:
    """Every row of `dataset` committed to `directory` by the workers; returns the row count."""
    from raypost import metrics

    return total(metrics.named(dataset.map_batches(commit_rows, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                                                   fn_kwargs=dict(directory=str(directory))), "write", str(directory)))


def total(counts, column: str = "rows") -> int:
    """The sum of a count column over the small rows the workers sent back (one per block)."""
    return totals(counts, [column])[column]


def totals(counts, columns: list[str]) -> dict[str, int]:
    """Count columns summed over the workers' count rows (one per block): the rows themselves
    stay on the workers; running `counts` runs the writes it stands for, once."""
    out = {c: 0 for c in columns}
    for row in counts.iter_rows():
        for c in columns:
            out[c] += int(row[c] or 0)
    return out
def natural_key(value: Any) -> tuple:
    """`gsm8k-9` before `gsm8k-10`: ids compare by their digit runs as numbers."""
    parts = re.split(r"(\d+)", str(value))
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def prompt_text(messages: Iterable[dict[str, Any]] | None) -> str:
    """The user's words: what dedup and diversity compare (system prompts are shared boilerplate)."""
    if messages is None:
        return ""
    return "\n".join(m["content"] for m in messages if m.get("role") == "user" and m.get("content"))


def question_text(messages: Iterable[dict[str, Any]] | None) -> str:
    """The last user message: the question to re-ask in another prompt."""
    users = [m["content"] for m in (messages or []) if m.get("role") == "user"]
    return users[-1] if users else ""


def to_python(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [to_python(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, dict):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def batch_rows(batch: pa.Table | dict[str, Any]) -> list[dict[str, Any]]:
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: to_python(batch[k][i]) for k in keys} for i in range(n)]


def rows_table(rows: list[dict[str, Any]], base: pa.Schema | None = None, extra: dict[str, pa.DataType] | None = None) -> pa.Table:
    """Rows as Arrow with stable column types: the input's schema plus typed new columns.

    Explicit types keep blocks concatenable even when a new column is all null in one block.
    """
    fields: list[pa.Field] = []
    names: set[str] = set()
    for f in list(base or []):
        if f.name not in (extra or {}):
            fields.append(f)
            names.add(f.name)
    for name, dtype in (extra or {}).items():
        fields.append(pa.field(name, dtype))
        names.add(name)
    for row in rows[:1]:
        for key in row:
            if key not in names:  # a column neither side declared: let Arrow infer it
                return pa.Table.from_pylist(rows)
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def with_columns(batch: pa.Table, columns: dict[str, pa.DataType]) -> pa.Table:
    """`batch` with exactly `columns`, cast to their types; a column the source lacks is null."""
    import pyarrow.compute as pc

    arrays = [pc.cast(batch.column(name), dtype) if name in batch.column_names else pa.nulls(batch.num_rows, dtype)
              for name, dtype in columns.items()]
    return pa.Table.from_arrays(arrays, schema=pa.schema(list(columns.items())))


def materialized(dataset):
    """`dataset` computed (its blocks stay in the object store) without its empty blocks.

    What goes into a Ray Data shuffle (groupby, join) passes here first: Ray Data 2.60 can leave a
    block without columns where a map's function returned no rows, and a shuffle task that meets
    one first gives every partition that empty schema and fails ("No match for FieldRef id").
    """
    import ray

    blocks = [entry.ref for bundle in dataset.materialize().iter_internal_ref_bundles() for entry in bundle.blocks
              if entry.metadata.num_rows]
    return ray.data.from_arrow_refs(blocks) if blocks else dataset.limit(0).materialize()


def by_id(dataset, function: Callable[..., pa.Table], partitions: int, **kwargs):
    """`function(block, **kwargs)` on blocks that each hold every row of the ids in them, sorted
    by id: a Ray Data hash repartition on `id` (what `groupby` does), then one call per block
    rather than one per id (a Python call per group cost ~10 ms: 6,000 ids took a minute)."""
    return materialized(dataset).repartition(partitions, keys=[schema.ID], sort=True).map_batches(
        function, batch_size=None, batch_format="pyarrow", num_cpus=LIGHT_CPUS, fn_kwargs=kwargs)


def id_groups(block: pa.Table) -> Iterable[list[dict[str, Any]]]:
    """The rows of a `by_id` block, one list per id."""
    import itertools

    for _, rows in itertools.groupby(block.to_pylist(), key=lambda row: row[schema.ID]):
        yield list(rows)


def first_samples(dataset, columns: list[str]):
    """One row per id, its lowest sample, with `_rows` (how many rows the id has), on the workers
    (the prompts a model-call step asks about once, however many samples they have)."""
    rows = materialized(dataset.select_columns(columns))
    return by_id(rows, _lowest_samples, join_partitions(rows.count()))


def _lowest_samples(block: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    keys = [(schema.ID, "ascending")] + ([(schema.SAMPLE_INDEX, "ascending")]
                                         if schema.SAMPLE_INDEX in block.column_names else [])
    block = block.take(pc.sort_indices(block, sort_keys=keys, null_placement="at_start"))
    ids = block.column(schema.ID).to_pylist()
    first = [n for n in range(len(ids)) if n == 0 or ids[n] != ids[n - 1]]
    counts = [end - start for start, end in zip(first, first[1:] + [len(ids)])]
    return block.take(first).append_column("_rows", pa.array(counts, pa.int64()))


def join_partitions(keys: int) -> int:
    """Hash partitions for a Ray Data join over `keys` ids: one per 50k (a partition is one
    task's memory), at least one, at most 64."""
    return max(1, min(64, keys // 50_000 + 1))


def attach(dataset, decisions, columns: dict[str, pa.DataType], step: str, log: CurationLog, partitions: int = 1):
    """Each id's decision joined to its rows on the workers (a Ray Data join on `id`).

    `decisions`: one row per id with `_sample` (the sample to keep), `columns` (added to it) and
    `_why` (set when the id is set aside). The kept sample gets the columns; every row of an id
    with a `_why` goes to `log` with it; an id's other samples are dropped (the step counts them).
    """
    names = column_names(dataset)
    base = dataset.drop_columns([c for c in columns if c in names]) if set(columns) & set(names) else dataset
    decided = materialized(decisions.select_columns([schema.ID, "_sample", *columns, "_why"]))
    joined = materialized(base).join(decided, "inner", num_partitions=partitions, on=(schema.ID,)).materialize()
    maps = dict(batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    set_aside = joined.map_batches(_set_aside, **maps, fn_kwargs=dict(columns=list(columns)))
    log.reject_rows(step, set_aside, lambda row: row.pop("_why"))
    return joined.map_batches(_kept_sample, **maps).materialize()


def _kept_sample(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    keep = pc.is_null(batch.column("_why"))
    if schema.SAMPLE_INDEX in batch.column_names:
        sample, chosen = batch.column(schema.SAMPLE_INDEX), batch.column("_sample")
        same = pc.or_(pc.fill_null(pc.equal(sample, chosen), False), pc.and_(pc.is_null(sample), pc.is_null(chosen)))
        keep = pc.and_(keep, same)
    return batch.filter(keep).drop_columns(["_sample", "_why"])


def _set_aside(batch: pa.Table, *, columns: list[str]) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_valid(batch.column("_why"))).drop_columns(["_sample", *columns])


def dataset_from_rows(rows: list[dict[str, Any]]):
    """Rows in the generation schema (or a subset) as a Ray Dataset with the schema's types."""
    import ray

    from raypost.runtime import ensure_ray

    ensure_ray()
    known = {f.name: f.type for f in schema.GENERATION_SCHEMA}
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    if all(c in known for c in columns):
        table = pa.Table.from_pylist(rows, schema=pa.schema([(c, known[c]) for c in columns]))
    else:
        table = pa.Table.from_pylist(rows)
    return ray.data.from_arrow(table)


def read_stage(path: str | Path):
    """A stage's output directory (its `part-*.parquet`, not its subdirectories) as a Dataset."""
    import ray

    from raypost.runtime import ensure_ray

    parts = records.part_files(path)
    if not parts:
        raise records.DataError(f"{path}: no part-*.parquet files (has the earlier stage run?)")
    ensure_ray()
    return ray.data.read_parquet([str(p) for p in parts])


def collect(dataset, columns: list[str] | None = None) -> pa.Table:
    """Materialize a Dataset (or some of its columns) as one Arrow table on the driver."""
    import ray

    if columns is not None:
        dataset = dataset.select_columns(columns)
    tables = [t for t in ray.get(dataset.to_arrow_refs()) if t.num_rows]
    if not tables:
        return pa.table({c: [] for c in (columns or [])})
    return pa.concat_tables(tables, promote_options="default")


def column_names(dataset) -> list[str]:
    found = dataset.schema()
    return [] if found is None else list(found.names)
