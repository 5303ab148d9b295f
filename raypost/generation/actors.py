"""Ray Data actor stage that runs any raypost Engine over batches of prompt rows."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from raypost import schema
from raypost.generation import batches, faults
from raypost.config import EngineConfig, SamplingConfig
from raypost.engines.base import Completion, Request


def completion_row(row: dict[str, Any], completion: Completion | None, engine: str, model: str,
                   error: str | None = None) -> dict[str, Any]:
    return {
        schema.ID: row[schema.ID],
        schema.MESSAGES: row[schema.MESSAGES],
        # an all-null column can come back from Ray Data's numpy batches as NaN
        schema.REFERENCE: row.get(schema.REFERENCE) if isinstance(row.get(schema.REFERENCE), str) else None,
        schema.SAMPLE_INDEX: int(row[schema.SAMPLE_INDEX]),
        schema.RESPONSE: None if completion is None else completion.text,
        schema.PROMPT_TOKENS: None if completion is None else completion.prompt_tokens,
        schema.COMPLETION_TOKENS: None if completion is None else completion.completion_tokens,
        schema.FINISH_REASON: None if completion is None else completion.finish_reason,
        schema.LOGPROBS: None if completion is None or completion.logprobs is None
        else [lp.as_record() for lp in completion.logprobs],
        schema.FIRST_TOKEN_ENTROPY: None if completion is None else completion.first_token_entropy,
        schema.ENGINE: engine,
        schema.MODEL: model,
        "error": error,
    }


def generated_rows(rows: list[dict[str, Any]], sampling: SamplingConfig, generate, backend: str,
                   model_label: str) -> list[dict[str, Any]]:
    """Generation rows for per-sample prompt rows; `generate(requests, sampling)` answers like
    `engines.generate_each` (completions, or a row's error message).

    Rows with the same seed share one engine call; samples get seed + sample_index so n samples
    of a prompt differ under sampling yet reruns reproduce them."""
    groups: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(int(row[schema.SAMPLE_INDEX]), []).append(row)
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for sample_index, group in groups.items():
        per_sample = sampling.model_copy(
            update={"n": 1, "seed": None if sampling.seed is None else sampling.seed + sample_index})
        requests = [Request(r[schema.ID], r[schema.MESSAGES], r.get(schema.REFERENCE)) for r in group]
        for row, out in zip(group, generate(requests, per_sample)):
            completion, error = (None, out) if isinstance(out, str) else (out[0], None)
            results[(row[schema.ID], sample_index)] = completion_row(row, completion, backend, model_label, error)
    return [results[(r[schema.ID], int(r[schema.SAMPLE_INDEX]))] for r in rows]


def on_engine_actor(table: pa.Table, *, actor, backend: str, sampling: dict[str, Any], model_label: str,
                    output_dir: str, rejected_dir: str, source: str, context_check: dict | None = None) -> pa.Table:
    """A batch of prompt rows answered by an engine actor that outlives the dataset (one engine
    for several models, see raypost.evaluation.stage), written like EngineActor's."""
    import ray

    if context_check is not None:
        table = batches.check_context(table, **context_check, rejected_dir=rejected_dir, source=source, render=False)
    sampling_config = SamplingConfig.model_validate(sampling)
    out = generated_rows(table.to_pylist(), sampling_config,
                         lambda requests, s: ray.get(actor.generate.remote(requests, s)), backend, model_label)
    return batches.write_outputs(pa.Table.from_pylist(out, schema=batches.GENERATED_SCHEMA),
                                 output_dir=output_dir, rejected_dir=rejected_dir, source=source)


class EngineActor:
    """Holds one engine for its lifetime; Ray Data calls it with batches of per-sample rows.

    It writes what it generated itself (a part per batch, see batches.write_outputs) and hands
    Ray Data only a row of counts, so no generated row passes through the driver. A failing
    batch is retried row by row so one bad row is set aside with its reason instead of failing
    the job.
    """

    def __init__(self, model: str, engine_config: dict[str, Any], sampling: dict[str, Any],
                 cache_dir: str | None, model_label: str, output_dir: str, rejected_dir: str, source: str,
                 fault: dict | None = None, context_check: dict | None = None):
        from raypost.engines import build_engine

        self.engine_config = EngineConfig.model_validate(engine_config)
        self.sampling = SamplingConfig.model_validate(sampling)
        self.engine = build_engine(model, self.engine_config, cache_dir)
        self.model_label = model_label
        self.output = dict(output_dir=output_dir, rejected_dir=rejected_dir, source=source)
        self.fault = None if fault is None else faults.WorkerFault(**fault)
        # the context-length check runs here, where the model's tokenizer is loaded anyway
        self.context_check = context_check

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.context_check is not None:
            table = batches.check_context(table, **self.context_check, rejected_dir=self.output["rejected_dir"],
                                          source=self.output["source"], render=False)
        out = self._run(table.to_pylist())
        stats = batches.write_outputs(pa.Table.from_pylist(out, schema=batches.GENERATED_SCHEMA), **self.output)
        if self.fault is not None:
            self.fault.part_written()
        return stats

    def _run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from raypost.engines import generate_each

        return generated_rows(rows, self.sampling, lambda requests, sampling: generate_each(self.engine, requests, sampling),
                              self.engine.backend, self.model_label)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
