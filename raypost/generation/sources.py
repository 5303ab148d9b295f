"""Prompt files read by Ray Data on the workers, never row by row through the driver.

    files = resolve_inputs(["s3://bucket/prompts/*.jsonl"])    # errors before any actor starts
    check_schemas(files, fmt)
    dataset = read_prompts(files, fmt)

The driver only lists the files (and reads Parquet footers); each read task parses one file,
normalizes its rows to the prompt schema and keeps the rows it cannot use as rows with an
`error` and their location (`file:line`, `file:row N`), so bad rows are set aside with the
rest instead of failing the job or disappearing. Local paths, globs, and any filesystem
pyarrow knows (s3, gs, hdfs) or fsspec has installed (`memory://`, `abfs://`, ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pyarrow as pa

from raypost import records, schema
from raypost.records import DataError, PromptFormat

ROWS_PER_BLOCK = 4096
BATCHES_PER_BLOCK = 4
# (file index, line) packed into one sortable int64: "the first occurrence" of an id
ORDER_SHIFT = 32
FORMATS = (".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet", ".arrow")

READ_SCHEMA = pa.schema([
    (schema.ID, pa.string()),
    (schema.MESSAGES, pa.list_(schema.MESSAGE_TYPE)),
    (schema.REFERENCE, pa.string()),
    ("order", pa.int64()),
    ("location", pa.string()),
    ("raw", pa.string()),
    ("error", pa.string()),
])


@dataclass(frozen=True)
class InputFiles:
    """The files of one input, sorted, with the filesystem that reads them."""

    uri: str
    paths: tuple[str, ...]
    filesystem: Any

    def __len__(self) -> int:
        return len(self.paths)


def _filesystem(uri: str):
    """(pyarrow filesystem, path within it) for a local path or URI; DataError if the scheme has none."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, OSError):
        pass
    protocol = uri.split("://", 1)[0]
    try:
        import fsspec

        fs = fsspec.filesystem(protocol)
    except (ImportError, ValueError) as error:
        raise DataError(f"{uri}: no filesystem for {protocol}:// is installed ({error})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs._strip_protocol(uri)


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def resolve_inputs(uris: list[str] | str) -> InputFiles:
    """List every file of the input (a file, a directory, a glob, or several of them)."""
    import pyarrow.fs as pafs

    uris = [uris] if isinstance(uris, str) else list(uris)
    if not uris:
        raise DataError("no input given")
    paths: list[str] = []
    filesystem = None
    for uri in uris:
        fs, path = _filesystem(str(uri))
        filesystem = filesystem or fs
        if _has_glob(path):
            matched = _glob(fs, path)
            if not matched:
                raise DataError(f"{uri}: the pattern matches no file")
            paths.extend(matched)
            continue
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{uri}: no such file or directory")
        if info.type == pafs.FileType.Directory:
            paths.extend(_directory_files(fs, path, uri))
        else:
            paths.append(path)
    for path in paths:
        if not path.lower().endswith(FORMATS):
            raise DataError(f"{path}: unknown format (expected .jsonl, .json, .parquet or a saved HF dataset dir)")
    return InputFiles(", ".join(map(str, uris)), tuple(sorted(dict.fromkeys(paths))), filesystem)


def _glob(fs, pattern: str) -> list[str]:
    import fnmatch

    import pyarrow.fs as pafs

    base = pattern.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0].rsplit("/", 1)[0] or "/"
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, pattern))


def _directory_files(fs, path: str, uri: str) -> list[str]:
    """Parquet parts of a stage output, the Arrow files of a dataset saved by `datasets`, or JSONL shards."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = {i.base_name: i.path for i in infos if i.type == pafs.FileType.File}
    if "dataset_dict.json" in names:
        raise DataError(f"{uri}: a DatasetDict; point at one split directory, e.g. {uri}/train")
    parquet = sorted(p for n, p in names.items() if n.endswith(".parquet") and not n.startswith("."))
    if parquet:
        return parquet
    if "dataset_info.json" in names or "state.json" in names:
        arrow = sorted(p for n, p in names.items() if n.endswith(".arrow"))
        if arrow:
            return arrow
    text = sorted(p for n, p in names.items() if n.lower().endswith((".jsonl", ".jsonl.gz", ".ndjson", ".json"))
                  and not n.startswith(".") and n not in ("dataset_info.json", "state.json"))
    if text:
        return text
    raise DataError(f"{uri}: directory holds no Parquet parts, JSONL files or saved HF dataset")


def check_schemas(files: InputFiles, fmt: PromptFormat) -> int | None:
    """Parquet and Arrow inputs must have the fields the format names, of a usable type (footers
    only). Returns the number of rows when every input is Parquet (from the footers), else None."""
    import pyarrow.parquet as pq

    rows: int | None = 0
    for path in files.paths:
        if path.endswith(".parquet"):
            with files.filesystem.open_input_file(path) as handle:
                metadata = pq.read_metadata(handle)
            file_schema = metadata.schema.to_arrow_schema()
            rows = None if rows is None else rows + metadata.num_rows
        elif path.endswith(".arrow"):
            with files.filesystem.open_input_stream(path) as handle:
                file_schema = pa.ipc.open_stream(handle).schema
            rows = None
        else:
            rows = None
            continue
        _check_fields(path, file_schema, fmt)
    return rows


def _check_fields(path: str, file_schema: pa.Schema, fmt: PromptFormat) -> None:
    names = set(file_schema.names)
    for role, name in (("prompt_field", fmt.prompt_field), ("id_field", fmt.id_field)):
        if name and name not in names:
            raise DataError(f"{path}: no column {name!r} ({role}); the file has {sorted(names)}")
    if fmt.reference_field and fmt.reference_field not in names:
        raise DataError(f"{path}: no column {fmt.reference_field!r} (reference_field); the file has {sorted(names)}")
    kind = file_schema.field(fmt.prompt_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_list(kind)
            or pa.types.is_large_list(kind)):
        raise DataError(f"{path}: column {fmt.prompt_field!r} is {kind}; expected text or a list of messages")


def iter_file_rows(handle, path: str) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
    """(location, row or the reason it cannot be parsed) for each row of one open file."""
    name = path.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(handle)
        index = 0
        for group in range(reader.num_row_groups):
            for row in reader.read_row_group(group).to_pylist():
                yield f"{path}:row {index}", row
                index += 1
    elif name.endswith(".arrow"):
        index = 0
        for batch in pa.ipc.open_stream(handle):
            for row in batch.to_pylist():
                yield f"{path}:row {index}", row
                index += 1
    elif name.endswith(".json"):
        data = json.loads(handle.read().decode("utf-8"))
        if not isinstance(data, list):
            yield f"{path}", DataError("expected a JSON list of objects")
            return
        for i, row in enumerate(data):
            yield f"{path}:item {i}", row if isinstance(row, dict) else DataError("item is not an object")
    else:
        yield from records.jsonl_rows(_lines(handle), path)


def _lines(handle, chunk_size: int = 1 << 20) -> Iterator[str]:
    """Lines of a binary stream read in chunks (a pyarrow stream has no readline)."""
    rest = b""
    while True:
        chunk = handle.read(chunk_size)
        if not chunk:
            break
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if rest:
        yield rest.decode("utf-8", errors="replace")


def _stem(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1].split(".")[0]


def prompt_blocks(handle, path: str, file_index: int, fmt: PromptFormat,
                  rows_per_block: int = ROWS_PER_BLOCK) -> Iterator[pa.Table]:
    """One file's rows in the read schema, `rows_per_block` at a time."""
    stem = _stem(path)
    block: list[dict[str, Any]] = []
    for index, (location, row) in enumerate(iter_file_rows(handle, path)):
        order = (file_index << ORDER_SHIFT) + index
        out = {schema.ID: None, schema.MESSAGES: None, schema.REFERENCE: None, "order": order,
               "location": location, "raw": None, "error": None}
        if isinstance(row, Exception):
            out["error"] = str(row)
        else:
            try:
                out.update(records.to_prompt_row(row, fmt, f"{stem}-{index}"))
            except ValueError as error:
                out[schema.ID] = records._maybe_id(row, fmt)
                out["raw"] = json.dumps(row, default=str, ensure_ascii=False)
                out["error"] = str(error)
        block.append(out)
        if len(block) >= rows_per_block:
            yield pa.Table.from_pylist(block, schema=READ_SCHEMA)
            block = []
    if block:
        yield pa.Table.from_pylist(block, schema=READ_SCHEMA)


def file_datasource(files: InputFiles, blocks: Callable[[Any, str], Iterator[pa.Table]]):
    """A Ray Data datasource over `files`: one read task a file, `blocks(open file, path)` turns
    it into Arrow blocks on the worker."""
    from ray.data.datasource import FileBasedDatasource

    class RowFiles(FileBasedDatasource):
        _FILE_EXTENSIONS = [ext.lstrip(".") for ext in FORMATS]

        def _open_input_source(self, filesystem, path, **open_args):
            if path.lower().endswith(".parquet"):  # Parquet needs random access to its footer
                return filesystem.open_input_file(path)
            return super()._open_input_source(filesystem, path, **open_args)

        def _read_stream(self, f, path: str):
            yield from blocks(f, path)

    return RowFiles(list(files.paths), filesystem=files.filesystem)


def _datasource(files: InputFiles, fmt: PromptFormat, rows_per_block: int):
    index_of = {path: i for i, path in enumerate(files.paths)}
    return file_datasource(files, lambda f, path: prompt_blocks(f, path, index_of[path], fmt, rows_per_block))


def read_prompts(files: InputFiles, fmt: PromptFormat, rows_per_block: int = ROWS_PER_BLOCK, **read_args):
    """A lazy Ray Dataset of prompt rows in READ_SCHEMA (bad rows carry `error`). Ray Data hands
    an actor whole blocks: blocks of a few engine batches keep every actor of a pool busy."""
    import ray

    return ray.data.read_datasource(_datasource(files, fmt, rows_per_block), **read_args)
