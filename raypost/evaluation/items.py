"""Item rows, scored and committed on the workers.

A Ray Data map over the generation parts scores each block with the benchmark's own `score`
(answer extraction; programs in the sandbox for code benchmarks, so they run where the rows are,
across the cluster) and commits its item rows as a Parquet part named by its keys. The driver
gets back (id, sample_index, correct, error_kind) per sample: what pass@k and its intervals need.
Responses, prompts and the programs' output never come back.

The benchmark's items (a few thousand: prompt, reference, the tests of a code task) travel once
through the object store as one Arrow table that every scoring task reads.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from raypost import schema
from raypost.evaluation.loaders import EvalItem
from raypost.evaluation.scoring import Score
from raypost.runtime import unshared

ITEM_SCHEMA = pa.schema([
    ("benchmark", pa.string()), ("id", pa.string()), ("subject", pa.string()), ("sample_index", pa.int64()),
    ("prompt", pa.string()), ("messages", pa.string()), ("response", pa.string()), ("extracted", pa.string()),
    ("reference", pa.string()), ("correct", pa.bool_()), ("error_kind", pa.string()),
    ("finish_reason", pa.string()), ("completion_tokens", pa.int64()), ("model", pa.string()),
])
VERDICT_SCHEMA = pa.schema([("id", pa.string()), ("sample_index", pa.int64()), ("correct", pa.bool_()),
                            ("error_kind", pa.string())])
TASK_SCHEMA = pa.schema([("id", pa.string()), ("subject", pa.string()), ("reference", pa.string()),
                         ("fields", pa.string()), ("messages", pa.string())])
GENERATED_COLUMNS = [schema.ID, schema.SAMPLE_INDEX, schema.RESPONSE, schema.FINISH_REASON, schema.COMPLETION_TOKENS]


def task_table(items: list[EvalItem], prompts: list[list[dict[str, str]]]) -> pa.Table:
    """The evaluated items with their prompts, as the scoring tasks read them."""
    return pa.Table.from_pylist([
        {"id": i.id, "subject": i.subject, "reference": i.reference, "fields": json.dumps(i.fields, ensure_ascii=False),
         "messages": json.dumps(m, ensure_ascii=False)} for i, m in zip(items, prompts)], schema=TASK_SCHEMA)


def item_row(task: dict[str, Any], sample: int, generated: dict[str, Any] | None, score: Score, *,
             benchmark: str, model: str, failure: str | None = None) -> dict[str, Any]:
    messages = json.loads(task["messages"])
    return {
        "benchmark": benchmark, "id": task["id"], "subject": task["subject"], "sample_index": sample,
        "prompt": messages[-1]["content"], "messages": task["messages"],
        "response": None if generated is None else generated[schema.RESPONSE],
        "extracted": score.extracted, "reference": task["reference"], "correct": bool(score.correct),
        "error_kind": score.error_kind,
        "finish_reason": generated.get(schema.FINISH_REASON) if generated is not None
        else (f"error: {failure}"[:500] if failure else None),
        "completion_tokens": None if generated is None else generated.get(schema.COMPLETION_TOKENS),
        "model": model,
    }


def score_block(batch: pa.Table, *, tasks: list, benchmark: str, options: dict[str, Any], n: int, model: str,
                items_dir: str) -> pa.Table:
    """Generation rows in; the item rows of the evaluated (id, sample) with a response committed
    to `items_dir`; one verdict row per item row out. `tasks`: [the task table or its ref]."""
    from raypost.evaluation.benchmarks import BenchmarkOptions, get_benchmark
    from raypost.generation.batches import commit_part

    table = unshared(tasks)
    batch = batch.select(GENERATED_COLUMNS)
    index = pc.index_in(pc.cast(batch.column(schema.ID), pa.string()), value_set=table.column("id"))
    keep = pc.and_(pc.and_(pc.is_valid(index), pc.less(batch.column(schema.SAMPLE_INDEX), n)),
                   pc.is_valid(batch.column(schema.RESPONSE)))
    batch, index = batch.filter(keep), index.filter(keep)
    if batch.num_rows == 0:
        return VERDICT_SCHEMA.empty_table()
    generated = batch.to_pylist()
    task_rows = table.take(index).to_pylist()
    items = [EvalItem(t["id"], t["reference"], json.loads(t["fields"]), t["subject"]) for t in task_rows]
    scores = get_benchmark(benchmark).score(items, generated, BenchmarkOptions(**options))
    rows = [item_row(t, int(g[schema.SAMPLE_INDEX]), g, s, benchmark=benchmark, model=model)
            for t, g, s in zip(task_rows, generated, scores)]
    out = pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)
    commit_part(items_dir, out, [f"{r['id']}\x00{r['sample_index']}" for r in rows])
    return out.select(VERDICT_SCHEMA.names)
