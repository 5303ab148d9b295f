"""What every curation step shares: reading rows into Ray Data, prompt text, ordering, the log.

Each step is `Dataset -> Dataset`. Rows a step sets aside, and what it measured, go to a
`CurationLog` the caller passes in, so the function signature stays Dataset in, Dataset out
and nothing leaves the pipeline without a reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from raypost import records, schema


@dataclass
class CurationLog:
    """Rejected rows (with step and reason) and each step's report, gathered on the driver."""

    rejected: list[records.Rejected] = field(default_factory=list)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)

    def reject(self, step: str, row: dict[str, Any], reason: str) -> None:
        # logprobs are bulky and say nothing about why a row was set aside
        kept = {k: v for k, v in row.items() if k != schema.LOGPROBS}
        self.rejected.append(records.Rejected(None if row.get(schema.ID) is None else str(row[schema.ID]),
                                              kept, f"curate:{step}", reason))

    def report(self, step: str, values: dict[str, Any]) -> None:
        key, i = step, 2
        while key in self.reports:  # the same step twice in one pipeline
            key, i = f"{step}_{i}", i + 1
        self.reports[key] = values

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rejected:
            out[r.source.split(":", 1)[1]] = out.get(r.source.split(":", 1)[1], 0) + 1
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


def attach_decisions(dataset, decision: dict[str, dict[str, Any]], columns: dict[str, pa.DataType]):
    """Keep, per id, the sample a decision names and add the decision's columns to it.

    `decision` maps id -> {"sample": sample_index, column: value, ...}; rows of other ids or
    other samples are dropped (the caller has already logged why).
    """

    def keep(batch: pa.Table) -> pa.Table:
        rows = []
        for row in batch.to_pylist():
            chosen = decision.get(str(row[schema.ID]))
            if chosen is None or row.get(schema.SAMPLE_INDEX) != chosen["sample"]:
                continue
            row.update({k: v for k, v in chosen.items() if k != "sample"})
            rows.append(row)
        return rows_table(rows, batch.schema, columns)

    return dataset.map_batches(keep, batch_format="pyarrow").materialize()


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
