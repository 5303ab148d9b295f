"""Large-model-guided response selection, after arXiv 2411.02939.

For each prompt, candidate responses are gathered (the dataset's reference solution, the
teacher's responses, the student's), and scored: the verifier first (a correct answer beats
an incorrect one), then the large model breaks ties, either by the candidate's perplexity
under it (lower is better) or as a judge that rates the answer 1-10. The best candidate is
the SFT target; best and worst are the KTO desirable/undesirable pair and the DPO/ORPO
chosen/rejected pair.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from raypost import schema
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.curation.sources import ResponseSource
from raypost.curation.rows import (LIGHT_CPUS, CurationLog, attach, by_id, column_names, first_samples, id_groups,
                                   join_partitions, materialized, question_text, rows_table)
from raypost.engines.judge import judge_messages, parse_grade

SCORE_COLUMNS = {"score": pa.float64(), schema.ERROR: pa.string()}


class PerplexityScorer:
    """Ray Data actor: mean log-probability per token of each candidate under the scoring model
    (the transformers engine's answer loss, negated)."""

    def __init__(self, model: str, cache_dir: str | None, max_length: int = 1024):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from raypost.engines import build_engine

        self.engine = build_engine(model, EngineConfig(backend="transformers", max_model_len=max_length), cache_dir)

    def score(self, messages: list[dict[str, str]], text: str) -> float:
        from raypost.engines import Request

        if not text:
            return float("-inf")
        [(mean_loss, summed)] = self.engine.answer_losses([Request("candidate", messages)], [text])
        return -mean_loss if summed else float("-inf")  # no answer token fits after the prompt

    def __call__(self, batch: pa.Table) -> pa.Table:
        from raypost.engines import row_error

        rows = batch.to_pylist()
        for row in rows:
            try:
                row["score"], row[schema.ERROR] = self.score(row[schema.MESSAGES], row["text"]), None
            except Exception as error:  # an unscorable candidate ranks last among equals, with its reason
                row["score"], row[schema.ERROR] = float("-inf"), row_error(error)
        return rows_table(rows, batch.schema, SCORE_COLUMNS)


class JudgeScorer:
    """Ray Data actor: the scoring model rates each candidate 1-10 (0 when it gives no number)."""

    def __init__(self, model: str, engine: dict[str, Any], cache_dir: str | None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from raypost.engines import build_engine

        self.engine = build_engine(model, EngineConfig.model_validate(engine), cache_dir)
        self.sampling = SamplingConfig(temperature=0.0, max_tokens=4)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from raypost.engines import Request

        rows = batch.to_pylist()
        requests = [Request(f"{r[schema.ID]}:{r['source']}", judge_messages(question_text(r[schema.MESSAGES]), r["text"]))
                    for r in rows]
        from raypost.engines import generate_each

        for row, out in zip(rows, generate_each(self.engine, requests, self.sampling)):
            if isinstance(out, str):  # the judge could not rate it: last among equals, with its reason
                row["score"], row[schema.ERROR] = float("-inf"), out
                continue
            row["score"], row[schema.ERROR] = parse_grade(out[0].text), None
        return rows_table(rows, batch.schema, SCORE_COLUMNS)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


CANDIDATE_SCHEMA = pa.schema([(schema.ID, pa.string()), ("source", pa.string()), ("text", pa.string()),
                              ("_rank", pa.int64()), (schema.MESSAGES, pa.list_(schema.MESSAGE_TYPE)),
                              (schema.REFERENCE, pa.string())])


def select_responses(dataset, *, candidates: list[ResponseSource], scorer: Literal["perplexity", "judge", "none"] = "perplexity",
                     scorer_model: str | None = None, scorer_engine: EngineConfig | None = None,
                     verify_kind: Literal["math", "code"] = "math", resources: Resources | None = None,
                     cache_dir: str | None = None, log: CurationLog | None = None):
    """One row per prompt with `best`, `worst` (and their sources) and every scored candidate.

    Prompts with no candidate at all are set aside; prompts whose candidates are all equal
    keep `best` (an SFT target) but get no pair (`worst` is null).

    Every row stays on the workers: each source's responses as a Dataset, the same text from two
    sources made one candidate per prompt (after a hash repartition on id), the verifier in a map,
    the large model on its actors, the ranking per prompt (repartitioned on id again) and the
    decision joined back to the rows. The driver receives the report's numbers (one task sums them
    on a worker).
    """
    import ray

    if scorer != "none" and scorer_model is None:
        raise ValueError("select: scorer_model is required for scorer perplexity or judge")
    log = log if log is not None else CurationLog()
    resources = resources or Resources()
    started = time.perf_counter()
    dataset = dataset.materialize()
    if not dataset.count():
        log.report("select", {"scorer": scorer, "scorer_model": scorer_model, "prompts_in": 0, "prompts_out": 0})
        return dataset
    names = column_names(dataset)
    units = materialized(first_samples(dataset, [c for c in (schema.ID, schema.SAMPLE_INDEX, schema.MESSAGES,
                                                             schema.REFERENCE) if c in names]))
    partitions = join_partitions(units.count())
    light = dict(batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    prompts = units.select_columns([c for c in (schema.ID, schema.MESSAGES, schema.REFERENCE) if c in names])
    found = []
    for rank, src in enumerate(candidates):
        responses, _ = src.dataset(dataset, units, resources=resources, cache_dir=cache_dir,
                                   progress=src.from_ == "generate" and f"curate: {src.name} candidates")
        if not {schema.MESSAGES, schema.REFERENCE} <= set(column_names(responses)):
            # an earlier stage's parts may hold only id and response: the prompt comes from the rows
            responses = responses.drop_columns([c for c in (schema.MESSAGES, schema.REFERENCE)
                                                if c in column_names(responses)])
            responses = materialized(responses).join(prompts, "inner", num_partitions=partitions, on=(schema.ID,))
        found.append(responses.map_batches(_as_candidates, **light, fn_kwargs=dict(
            name=src.name, numbered=src.from_ != "reference", rank=rank)))
    pool = by_id(found[0].union(*found[1:]) if found else units.limit(0), _distinct_texts, partitions)
    # the verifier first
    pool = pool.map_batches(_verify_candidates, **light, fn_kwargs=dict(kind=verify_kind))
    # then the large model
    if scorer == "perplexity":
        pool = pool.map_batches(PerplexityScorer, fn_constructor_kwargs=dict(model=scorer_model, cache_dir=cache_dir),
                                batch_size=16, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
                                num_cpus=resources.cpus_per_actor, num_gpus=resources.gpus_per_actor)
    elif scorer == "judge":
        pool = pool.map_batches(JudgeScorer, fn_constructor_kwargs=dict(
            model=scorer_model, engine=(scorer_engine or EngineConfig()).model_dump(), cache_dir=cache_dir),
            batch_size=16, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
            num_cpus=resources.cpus_per_actor, num_gpus=resources.gpus_per_actor)
    else:
        pool = pool.map_batches(_unscored, **light)
    ranked = by_id(pool, _rank_candidates, partitions)
    decisions = units.select_columns([c for c in (schema.ID, schema.SAMPLE_INDEX) if c in names]).join(
        materialized(ranked), "left_outer", num_partitions=partitions, on=(schema.ID,)
    ).map_batches(_decide, **light).materialize()
    numbers = ray.get(ray.remote(select_numbers).options(num_cpus=LIGHT_CPUS).remote(
        *decisions.select_columns(["_why", schema.BEST_SOURCE, "_pair", "_candidates", "_unscored",
                                   "_unscored_first"]).to_arrow_refs()))
    selected = attach(dataset, decisions, schema.SELECT_COLUMNS, "select", log, partitions)
    log.report("select", {"scorer": scorer, "scorer_model": scorer_model, **numbers,
                          "seconds": round(time.perf_counter() - started, 3)})
    return selected


def _as_candidates(batch: pa.Table, *, name: str, numbered: bool, rank: int) -> pa.Table:
    """Ray Data batch function: a source's response rows -> candidates (`source` is the source's
    name, with `#sample` where it has several); rows without text are none."""
    out = []
    for row in batch.to_pylist():
        text = row.get(schema.RESPONSE)
        if isinstance(text, str) and text.strip():
            sample = row.get(schema.SAMPLE_INDEX) or 0
            out.append({schema.ID: str(row[schema.ID]), "source": f"{name}#{sample}" if numbered else name,
                        "text": text, "_rank": rank * 1_000_000 + sample, schema.MESSAGES: row.get(schema.MESSAGES),
                        schema.REFERENCE: row.get(schema.REFERENCE)})
    return pa.Table.from_pylist(out, schema=CANDIDATE_SCHEMA)


def _distinct_texts(block: pa.Table) -> pa.Table:
    """`by_id` block function: the same text from two sources is one candidate (the first source's)."""
    import pyarrow.compute as pc

    block = block.take(pc.sort_indices(block, sort_keys=[(schema.ID, "ascending"), ("_rank", "ascending")]))
    seen: set[tuple[str, str]] = set()
    keep = []
    for key in zip(block.column(schema.ID).to_pylist(), block.column("text").to_pylist()):
        keep.append(key not in seen)
        seen.add(key)
    return block.filter(pa.array(keep, pa.bool_()))


def _verify_candidates(batch: pa.Table, *, kind: str) -> pa.Table:
    """Ray Data batch function: `verified` of each candidate (null where the prompt has no reference)."""
    from raypost.verify import verify_rows

    rows = batch.to_pylist()
    checked = verify_rows(rows, kind=kind, response_field="text", reference_field=schema.REFERENCE) if rows else []
    verified = [c[schema.VERIFIED] if r.get(schema.REFERENCE) else None for r, c in zip(rows, checked)]
    return batch.append_column(schema.VERIFIED, pa.array(verified, pa.bool_()))


def _unscored(batch: pa.Table) -> pa.Table:
    return batch.append_column("score", pa.array([0.0] * batch.num_rows, pa.float64())).append_column(
        schema.ERROR, pa.nulls(batch.num_rows, pa.string()))


RANKED_SCHEMA = pa.schema([(schema.ID, pa.string()), *((c, t) for c, t in schema.SELECT_COLUMNS.items()),
                           ("_pair", pa.int64()), ("_candidates", pa.int64()), ("_unscored", pa.int64()),
                           ("_unscored_first", pa.string())])


def _rank_candidates(block: pa.Table) -> pa.Table:
    """`by_id` block function: each prompt's scored candidates -> best, worst (when they differ)
    and every candidate in rank order: a verified answer beats an unverified one (no reference
    ranks as unverified), then the large model's score, then the source's name."""
    out = []
    for cands in id_groups(block):
        ranked = sorted(cands, key=lambda c: (bool(c.get(schema.VERIFIED)),
                                              c["score"] if np.isfinite(c["score"]) else -1e30, c["source"]), reverse=True)
        best, worst = ranked[0], ranked[-1]
        has_pair = len(ranked) > 1 and (bool(best.get(schema.VERIFIED)), best["score"]) != \
            (bool(worst.get(schema.VERIFIED)), worst["score"])
        unscored = [c for c in cands if c.get(schema.ERROR)]
        out.append({
            schema.ID: best[schema.ID],
            schema.BEST: best["text"], schema.BEST_SOURCE: best["source"],
            schema.WORST: worst["text"] if has_pair else None,
            schema.WORST_SOURCE: worst["source"] if has_pair else None,
            schema.CANDIDATES: [{"source": c["source"], "text": c["text"], "verified": c.get(schema.VERIFIED),
                                 "score": c["score"] if np.isfinite(c["score"]) else None} for c in ranked],
            "_pair": int(has_pair), "_candidates": len(cands), "_unscored": len(unscored),
            "_unscored_first": f"{unscored[0][schema.ID]}: {unscored[0][schema.ERROR]}" if unscored else None,
        })
    return pa.Table.from_pylist(out, schema=RANKED_SCHEMA)


def _decide(batch: pa.Table) -> pa.Table:
    """Ray Data batch function: each prompt's ranking (or none) -> the decision `attach` reads:
    the prompt's first sample is kept; a prompt without a candidate is set aside."""
    import pyarrow.compute as pc

    sample = (batch.column(schema.SAMPLE_INDEX) if schema.SAMPLE_INDEX in batch.column_names
              else pa.nulls(batch.num_rows, pa.int32()))
    why = pc.if_else(pc.is_null(batch.column(schema.BEST)),
                     "no candidate response (no reference, teacher or student text)", pa.scalar(None, pa.string()))
    return batch.append_column("_sample", pc.cast(sample, pa.int32())).append_column("_why", why)


def select_numbers(*tables: pa.Table) -> dict[str, Any]:
    """The report's numbers from every prompt's decision (a few values each), in one task."""
    rows = [r for t in tables if t.num_rows for r in t.to_pylist()]
    decided = [r for r in rows if r["_why"] is None]
    best_sources: dict[str, int] = {}
    for r in decided:
        key = r[schema.BEST_SOURCE].split("#")[0]
        best_sources[key] = best_sources.get(key, 0) + 1
    return {
        "prompts_in": len(rows),
        "prompts_out": len(decided),
        "candidates": sum(r["_candidates"] or 0 for r in rows),
        "unscored": sum(r["_unscored"] or 0 for r in rows),
        "unscored_first": next((r["_unscored_first"] for r in rows if r["_unscored_first"]), None),
        "pairs": sum(r["_pair"] or 0 for r in rows),
        "best_by_source": best_sources,
    }
