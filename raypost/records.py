"""Reading prompt files and writing stage outputs as Parquet part files.

Outputs are directories of `part-*.parquet` files, each written atomically (temp file,
then rename), so a crash leaves only whole parts behind and a rerun can skip what is done.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from raypost import schema


class DataError(ValueError):
    """A data file that cannot be read at all (missing, wrong format)."""


@dataclass
class PromptFormat:
    """How to turn a source row into a prompt row.

    prompt_field: a plain-text prompt column, or a chat `messages` column (list of role/content).
    id_field: column holding a stable id; when absent the id is `<file stem>-<row number>`.
    reference_field: gold answer column, optional.
    system_prompt: prepended as a system message to plain-text prompts.
    """

    prompt_field: str = "prompt"
    id_field: str | None = None
    reference_field: str | None = None
    system_prompt: str | None = None


@dataclass
class Rejected:
    id: str | None
    row: dict[str, Any]
    source: str
    reason: str


@dataclass
class LoadedPrompts:
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def iter_source_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """Yield (location, row) for each row of a JSONL/JSON/Parquet file or a saved HF dataset.

    A row that cannot be parsed is yielded as an exception so the caller can reject it
    with its line number instead of failing the whole file.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        parquet_parts = sorted(p.glob("*.parquet"))
        if parquet_parts:
            for part in parquet_parts:
                yield from iter_source_rows(part)
            return
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            import datasets

            loaded = datasets.load_from_disk(str(p))
            if isinstance(loaded, datasets.DatasetDict):
                raise DataError(f"{p}: a DatasetDict; point at one split directory, e.g. {p}/train")
            for i, row in enumerate(loaded):
                yield f"{p}:row {i}", dict(row)
            return
        raise DataError(f"{p}: directory holds neither Parquet parts nor a saved HF dataset")
    name = p.name.lower()
    if name.endswith(".parquet"):
        table = pq.read_table(p)
        for i, row in enumerate(table.to_pylist()):
            yield f"{p}:row {i}", row
    elif name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        import gzip

        opener = gzip.open if name.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8") as handle:
            yield from jsonl_rows(handle, str(p))
    elif name.endswith(".json"):
        data = json.loads(p.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of objects")
        for i, row in enumerate(data):
            yield f"{p}:item {i}", row if isinstance(row, dict) else DataError("item is not an object")
    else:
        raise DataError(f"{p}: unknown format (expected .jsonl, .json, .parquet or a saved HF dataset dir)")


def jsonl_rows(lines: Iterable[str], path: str) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """(path:line, row or why it is unusable) for each non-blank line of a JSONL file."""
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            yield f"{path}:{line_number}", DataError(f"invalid JSON: {error.msg}")
            continue
        yield f"{path}:{line_number}", row if isinstance(row, dict) else DataError("line is not a JSON object")


def _normalize_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list of {role, content}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role must be system, user or assistant, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def to_prompt_row(row: dict[str, Any], fmt: PromptFormat, default_id: str) -> dict[str, Any]:
    """Normalize one source row to the prompt schema; raises ValueError naming the bad field."""
    if fmt.prompt_field not in row or row[fmt.prompt_field] is None:
        raise ValueError(f"missing field {fmt.prompt_field!r}")
    value = row[fmt.prompt_field]
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"field {fmt.prompt_field!r} is empty")
        messages = [{"role": "user", "content": value}]
        if fmt.system_prompt:
            messages.insert(0, {"role": "system", "content": fmt.system_prompt})
    elif isinstance(value, list):
        messages = _normalize_messages(value)
    else:
        raise ValueError(f"field {fmt.prompt_field!r} must be a string or a list of messages, got {type(value).__name__}")
    if fmt.id_field:
        if row.get(fmt.id_field) is None:
            raise ValueError(f"missing id field {fmt.id_field!r}")
        row_id = str(row[fmt.id_field])
    else:
        row_id = default_id
    reference = None
    if fmt.reference_field:
        reference = row.get(fmt.reference_field)
        reference = None if reference is None else str(reference)
    return {schema.ID: row_id, schema.MESSAGES: messages, schema.REFERENCE: reference}


def load_prompts(path: str | os.PathLike, fmt: PromptFormat) -> LoadedPrompts:
    """Read a prompt file; bad rows and repeated ids are set aside with their location and reason."""
    loaded = LoadedPrompts()
    seen: set[str] = set()
    stem = Path(path).name.split(".")[0]
    for index, (location, row) in enumerate(iter_source_rows(path)):
        default_id = f"{stem}-{index}"
        if isinstance(row, Exception):
            loaded.rejected.append(Rejected(None, {}, location, str(row)))
            continue
        try:
            prompt = to_prompt_row(row, fmt, default_id)
        except ValueError as error:
            loaded.rejected.append(Rejected(_maybe_id(row, fmt), row, location, str(error)))
            continue
        if prompt[schema.ID] in seen:
            loaded.rejected.append(Rejected(prompt[schema.ID], row, location, "duplicate id"))
            continue
        seen.add(prompt[schema.ID])
        loaded.rows.append(prompt)
    return loaded


def _maybe_id(row: dict[str, Any], fmt: PromptFormat) -> str | None:
    value = row.get(fmt.id_field) if fmt.id_field else None
    return None if value is None else str(value)


def write_part(directory: str | os.PathLike, rows: list[dict[str, Any]], table_schema: pa.Schema | None = None) -> Path | None:
    """Write rows as one new Parquet part, atomically. Returns the part path (None for no rows)."""
    if not rows:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=table_schema) if table_schema else pa.Table.from_pylist(rows)
    name = f"part-{uuid.uuid4().hex}.parquet"
    tmp = directory / f".{name}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, directory / name)
    return directory / name


def write_rejected(directory: str | os.PathLike, rejected: Iterable[Rejected]) -> int:
    rows = [
        {"id": r.id, "row": json.dumps(r.row, default=str, ensure_ascii=False), "source": r.source, "reason": r.reason}
        for r in rejected
    ]
    write_part(directory, rows, schema.REJECTED_SCHEMA)
    from raypost import metrics

    metrics.count(str(directory), len(rows), rejected=True)
    return len(rows)


def part_files(directory: str | os.PathLike) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(directory.glob("part-*.parquet"))


def read_table(directory: str | os.PathLike, columns: list[str] | None = None) -> pa.Table | None:
    """All parts of an output directory as one table (None if nothing was written yet)."""
    parts = part_files(directory)
    if not parts:
        return None
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in parts], promote_options="default")


def read_rows(directory: str | os.PathLike) -> list[dict[str, Any]]:
    table = read_table(directory)
    return [] if table is None else table.to_pylist()


def count_rows(directory: str | os.PathLike) -> int:
    return sum(pq.ParquetFile(p).metadata.num_rows for p in part_files(directory))
