"""What `curate` reads: a stage's output directory, or row files read by Ray Data on the workers.

    dataset = read_input("runs/x/teacher")              # a stage's part-*.parquet
    dataset = read_input("s3://bucket/answers/*.jsonl")  # files, directories, globs, URIs

The driver lists the files (a missing path, a glob that matches nothing or a filesystem that is
not installed stops here, naming the path, before any task starts). Read tasks keep each row as
its JSON text with its location (`file:line`, `file:row N`); one pass on the workers infers
each block's column types, which the driver unifies (the generation schema's own types for its
columns), and a second turns the text into typed rows. A line that is not JSON, or a row whose
values do not fit the columns' types, stays in the dataset with `_unreadable` (the reason) and
`_source` (its location): `validate` sets it aside with the rest, committed by the workers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from raypost import records, schema
from raypost.generation import sources
from raypost.generation.batches import LIGHT_CPUS

UNREADABLE, SOURCE, RAW = "_unreadable", "_source", "_raw"
RAW_SCHEMA = pa.schema([(SOURCE, pa.string()), (RAW, pa.string()), (UNREADABLE, pa.string())])
KNOWN_TYPES = {f.name: f.type for f in schema.GENERATION_SCHEMA}
ROWS_PER_BLOCK = 32768


def read_input(path: str | Path):
    """The rows of a stage directory or of row files, as a Dataset (see the module doc)."""
    from raypost.curation.rows import read_stage
    from raypost.runtime import ensure_ray

    text = str(path)
    if "://" not in text and Path(text).is_dir() and records.part_files(text):
        return read_stage(text)
    files = sources.resolve_inputs(text)
    ensure_ray()
    import ray

    raw = ray.data.read_datasource(sources.file_datasource(files, raw_blocks)).materialize()
    table_schema = _unified(raw)
    return raw.map_batches(typed_rows, batch_format="pyarrow", batch_size=None, num_cpus=LIGHT_CPUS,
                           fn_kwargs=dict(table_schema=table_schema))


def raw_blocks(handle, path: str) -> Any:
    """One file's rows as (location, JSON text) blocks; a row that cannot be parsed keeps why."""
    block: list[dict[str, Any]] = []
    for location, row in sources.iter_file_rows(handle, path):
        if isinstance(row, Exception):
            block.append({SOURCE: location, RAW: None, UNREADABLE: str(row)})
        else:
            block.append({SOURCE: location, RAW: json.dumps(row, default=str, ensure_ascii=False), UNREADABLE: None})
        if len(block) >= ROWS_PER_BLOCK:
            yield pa.Table.from_pylist(block, schema=RAW_SCHEMA)
            block = []
    if block:
        yield pa.Table.from_pylist(block, schema=RAW_SCHEMA)


def _rows(batch: pa.Table) -> list[dict[str, Any] | None]:
    return [None if text is None else json.loads(text) for text in batch.column(RAW).to_pylist()]


COLUMNS_SCHEMA = pa.schema([("name", pa.string()), ("schema", pa.binary())])


def column_types(batch: pa.Table) -> pa.Table:
    """One row per column seen in the block: its name and, for a column outside the generation
    schema, the type its values infer to (serialized; null where they do not agree here)."""
    rows = [r for r in _rows(batch) if r is not None]
    out = []
    for name in dict.fromkeys(k for r in rows for k in r):
        inferred = None
        if name not in KNOWN_TYPES:
            try:
                inferred = pa.schema([(name, pa.array([r.get(name) for r in rows]).type)]).serialize().to_pybytes()
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                pass
        out.append({"name": name, "schema": inferred})
    return pa.Table.from_pylist(out, schema=COLUMNS_SCHEMA)


def _unified(raw) -> pa.Schema:
    """The columns of every block, in order of appearance: the generation schema's types for its
    columns; for the others, the blocks' inferred types unified (the first where they conflict)."""
    found = list(raw.map_batches(column_types, batch_format="pyarrow", batch_size=None,
                                 num_cpus=LIGHT_CPUS).iter_rows())
    names = list(dict.fromkeys(row["name"] for row in found))
    fields = []
    for name in names:
        if name in KNOWN_TYPES:
            fields.append(pa.field(name, KNOWN_TYPES[name]))
            continue
        schemas = [pa.ipc.read_schema(pa.py_buffer(row["schema"])) for row in found
                   if row["name"] == name and row["schema"] is not None]
        try:
            kind = pa.unify_schemas(schemas, promote_options="permissive").field(name).type if schemas else pa.null()
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            kind = next((s.field(name).type for s in schemas if s.field(name).type != pa.null()), pa.null())
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


def typed_rows(batch: pa.Table, *, table_schema: pa.Schema) -> pa.Table:
    """JSON text in, rows of `table_schema` out (plus `_source` and `_unreadable`); a row that
    does not fit the types keeps its JSON text and the reason, to be set aside."""
    out_schema = pa.schema(list(table_schema) + list(RAW_SCHEMA))
    empty = {name: None for name in table_schema.names}
    records_ = [{**empty, **(row or {}), SOURCE: location, RAW: None, UNREADABLE: problem}
                for row, location, problem in zip(_rows(batch), batch.column(SOURCE).to_pylist(),
                                                  batch.column(UNREADABLE).to_pylist())]
    try:
        return pa.Table.from_pylist(records_, schema=out_schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        pass
    # some row does not fit: find it, keep the others typed
    out = []
    for record, text in zip(records_, batch.column(RAW).to_pylist()):
        try:
            pa.Table.from_pylist([record], schema=out_schema)
            out.append(record)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as error:
            out.append({**empty, SOURCE: record[SOURCE], RAW: text,
                        UNREADABLE: f"a value does not fit its column's type: {error}"})
    return pa.Table.from_pylist(out, schema=out_schema)
