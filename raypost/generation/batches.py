"""What generation does to each batch, on the workers: set bad rows aside, expand samples, check
the context length, write the finished rows.

Every part a worker writes is named by the hash of the keys in it and committed by rename: a
retried batch (a lost actor, a lost node) rewrites its own part instead of adding a second one,
so every (id, sample) lands exactly once; an interrupted run leaves only whole parts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raypost import schema

ERROR = "error"
# rows -> checks -> rows: light steps that must not hold a CPU an engine actor needs
LIGHT_CPUS = 0.25
GENERATED_SCHEMA = schema.GENERATION_SCHEMA.append(pa.field(ERROR, pa.string()))
STATS_SCHEMA = pa.schema([
    ("rows", pa.int64()), ("rejected", pa.int64()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
])


def _part_name(keys: list[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(keys)).encode("utf-8")).hexdigest()[:32]
    return f"part-{digest}.parquet"


def commit_part(directory: str | os.PathLike, table: pa.Table, keys: list[str], *, rejected: bool = False) -> Path | None:
    """Write `table` as the part named by its keys, atomically (temp file, then rename), and count
    its rows in the Ray metrics of `directory` (raypost.metrics; `rejected`: set-aside rows)."""
    from raypost import metrics

    if table.num_rows == 0:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _part_name(keys)
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    metrics.count(str(directory), table.num_rows, rejected=rejected)
    return path


def reject(rejected_dir: str, rows: list[dict[str, Any]]) -> int:
    """rows: {id, row (JSON text), source, reason}."""
    if rows:
        table = pa.Table.from_pylist(rows, schema=schema.REJECTED_SCHEMA)
        commit_part(rejected_dir, table, [f"{r['source']}\x00{r['id']}\x00{r['reason']}" for r in rows], rejected=True)
    return len(rows)


def _prompt_json(row: dict[str, Any]) -> str:
    return json.dumps({k: row.get(k) for k in (schema.ID, schema.MESSAGES, schema.REFERENCE)}, ensure_ascii=False)


def split_prompts(table: pa.Table, *, rejected_dir: str, duplicates: dict[str, int], n: int,
                  need_reference: bool) -> pa.Table:
    """Read rows (sources.READ_SCHEMA) in; good prompt rows, one per sample, out. Unparseable rows,
    repeats of an id (all but its first occurrence) and, for the reference engine, rows without a
    gold answer are written to `rejected_dir` with their location and reason."""
    bad = pc.is_valid(table[ERROR])
    if duplicates:
        candidates = pc.and_(pc.invert(bad), pc.is_in(table[schema.ID], value_set=pa.array(list(duplicates))))
        if pc.any(candidates).as_py():
            ids, orders = table[schema.ID].to_pylist(), table["order"].to_pylist()
            repeat = [c and duplicates[i] != o for c, i, o in zip(candidates.to_pylist(), ids, orders)]
            bad = pc.or_(bad, pa.array(repeat))
    if need_reference:
        bad = pc.or_(bad, pc.and_(pc.invert(bad), pc.is_null(table[schema.REFERENCE])))
    rejected = table.filter(bad)
    if rejected.num_rows:
        reject(rejected_dir, [_rejected_read_row(r, duplicates) for r in rejected.to_pylist()])
    good = table.filter(pc.invert(bad)).select([schema.ID, schema.MESSAGES, schema.REFERENCE])
    return pa.concat_tables([
        good.append_column(schema.SAMPLE_INDEX, pa.array([k] * good.num_rows, pa.int32())) for k in range(n)
    ])


def _rejected_read_row(row: dict[str, Any], duplicates: dict[str, int]) -> dict[str, Any]:
    if row[ERROR] is not None:
        reason, raw = row[ERROR], row["raw"] or "{}"
    elif row[schema.ID] in duplicates and duplicates[row[schema.ID]] != row["order"]:
        reason, raw = "duplicate id", _prompt_json(row)
    else:
        reason, raw = "no reference answer", _prompt_json(row)
    return {schema.ID: row[schema.ID], "row": raw, "source": row["location"], "reason": reason}


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def id_hashes(table: pa.Table) -> pa.Table:
    """(hash of id, order) of the readable rows: what the duplicate check needs of each row."""
    good = table.filter(pc.is_null(table[ERROR]))
    return pa.table({"hash": pa.array([_hash64(i) for i in good[schema.ID].to_pylist()], pa.int64()),
                     "order": good["order"]})


def rows_with_hashes(table: pa.Table, *, hashes: list[int]) -> pa.Table:
    good = table.filter(pc.is_null(table[ERROR]))
    wanted = set(hashes)
    mask = pa.array([_hash64(i) in wanted for i in good[schema.ID].to_pylist()], pa.bool_())
    return good.filter(mask).select([schema.ID, "order"])


@functools.lru_cache(maxsize=2)
def _done_keys(done_parts: tuple[str, ...]) -> pa.Table:
    keys = [pq.read_table(p, columns=[schema.ID, schema.SAMPLE_INDEX]) for p in done_parts]
    return pa.concat_tables(keys).combine_chunks()


def drop_done(table: pa.Table, *, done_parts: tuple[str, ...]) -> pa.Table:
    """Rows whose (id, sample) none of `done_parts` holds (read once per worker process)."""
    if table.num_rows == 0:
        return table
    keys = table.select([schema.ID, schema.SAMPLE_INDEX]).append_column("row", pa.array(range(table.num_rows), pa.int64()))
    # Arrow joins carry no list columns (messages): join the keys, then take the rows
    left = keys.join(_done_keys(done_parts), keys=[schema.ID, schema.SAMPLE_INDEX], join_type="left anti")
    return table.take(pa.array(sorted(left["row"].to_pylist()), pa.int64()))


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def check_context(table: pa.Table, *, model_path: str, max_model_len: int, rejected_dir: str, source: str,
                  render: bool) -> pa.Table:
    """Set aside prompts that leave no room for an answer in the model's context; with `render`,
    add the model text of each prompt (`prompt`) for engines that take text (vLLM)."""
    from raypost.engines.chat import render_prompt

    tokenizer = _tokenizer(model_path)
    rows = table.to_pylist()
    texts = [render_prompt(tokenizer, r[schema.MESSAGES]) for r in rows]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    keep = [n < max_model_len for n in lengths]
    too_long = [
        {schema.ID: r[schema.ID], "row": _prompt_json(r), "source": source,
         "reason": f"prompt has {n} tokens; the model's context is {max_model_len}"}
        for r, n, k in zip(rows, lengths, keep) if not k and r[schema.SAMPLE_INDEX] == 0
    ]
    reject(rejected_dir, too_long)
    kept = table.filter(pa.array(keep, pa.bool_()))
    if render:
        kept = kept.append_column("prompt", pa.array([t for t, k in zip(texts, keep) if k], pa.string()))
    return kept


class PromptRenderer:
    """check_context with rendering, as a Ray Data actor: one tokenizer load per actor, where
    tasks would each import transformers again (seconds a task on a small machine)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        _tokenizer(kwargs["model_path"])

    def __call__(self, table: pa.Table) -> pa.Table:
        return check_context(table, **self.kwargs, render=True)


def write_outputs(table: pa.Table, *, output_dir: str, rejected_dir: str, source: str) -> pa.Table:
    """Generated rows (GENERATED_SCHEMA) in: the good ones committed as one part, the failed ones
    as rejected rows with the engine's error; one row of counts out for the driver."""
    failed = pc.is_valid(table[ERROR])
    good = table.filter(pc.invert(failed)).drop_columns([ERROR]).cast(schema.GENERATION_SCHEMA)
    commit_part(output_dir, good, [f"{i}\x00{k}" for i, k in zip(good[schema.ID].to_pylist(),
                                                                   good[schema.SAMPLE_INDEX].to_pylist())])
    bad = table.filter(failed).to_pylist()
    reject(rejected_dir, [
        {schema.ID: r[schema.ID], "row": json.dumps({k: r[k] for k in (schema.ID, schema.MESSAGES, schema.SAMPLE_INDEX)},
                                                    ensure_ascii=False),
         "source": source, "reason": r[ERROR]}
        for r in bad
    ])

    def total(column: str) -> int:
        return int(pc.sum(good[column]).as_py() or 0) if good.num_rows else 0

    return pa.Table.from_pylist([{"rows": good.num_rows, "rejected": len(bad), "prompt_tokens": total(schema.PROMPT_TOKENS),
                                  "completion_tokens": total(schema.COMPLETION_TOKENS)}], schema=STATS_SCHEMA)
