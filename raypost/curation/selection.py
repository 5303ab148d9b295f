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
from raypost.curation.rows import CurationLog, attach_decisions, collect, column_names, natural_key, question_text, rows_table
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


def _gather(sources: list[ResponseSource], by_id: dict[str, list[dict[str, Any]]], resources: Resources | None,
            cache_dir: str | None) -> dict[str, list[dict[str, Any]]]:
    candidates: dict[str, list[dict[str, Any]]] = {i: [] for i in by_id}
    for src in sources:
        found, _ = src.responses(by_id, resources=resources, cache_dir=cache_dir,
                                 progress=src.from_ == "generate" and f"curate: {src.name} candidates")
        for i, rows in found.items():
            for r in rows:
                text = r.get(schema.RESPONSE)
                if isinstance(text, str) and text.strip():
                    label = src.name if src.from_ == "reference" else f"{src.name}#{r.get(schema.SAMPLE_INDEX) or 0}"
                    candidates[i].append({"source": label, "text": text})
    return candidates


def select_responses(dataset, *, candidates: list[ResponseSource], scorer: Literal["perplexity", "judge", "none"] = "perplexity",
                     scorer_model: str | None = None, scorer_engine: EngineConfig | None = None,
                     verify_kind: Literal["math", "code"] = "math", resources: Resources | None = None,
                     cache_dir: str | None = None, log: CurationLog | None = None):
    """One row per prompt with `best`, `worst` (and their sources) and every scored candidate.

    Prompts with no candidate at all are set aside; prompts whose candidates are all equal
    keep `best` (an SFT target) but get no pair (`worst` is null).
    """
    import ray

    from raypost.verify import verify_rows

    log = log if log is not None else CurationLog()
    resources = resources or Resources()
    started = time.perf_counter()
    dataset = dataset.materialize()
    names = column_names(dataset)
    light = collect(dataset, [c for c in (schema.ID, schema.SAMPLE_INDEX, schema.MESSAGES, schema.REFERENCE,
                                          schema.RESPONSE) if c in names]).to_pylist()
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in light:
        by_id.setdefault(str(row[schema.ID]), []).append(row)
    gathered = _gather(candidates, by_id, resources, cache_dir)

    flat = []
    for i, cands in gathered.items():
        seen: set[str] = set()
        for c in cands:
            if c["text"] in seen:  # the same text from two sources is one candidate
                continue
            seen.add(c["text"])
            flat.append({schema.ID: i, schema.MESSAGES: by_id[i][0][schema.MESSAGES],
                         schema.REFERENCE: by_id[i][0].get(schema.REFERENCE), "source": c["source"], "text": c["text"]})
    # the verifier first
    for row, checked in zip(flat, verify_rows([dict(r) for r in flat], kind=verify_kind, response_field="text",
                                              reference_field=schema.REFERENCE) if flat else []):
        row[schema.VERIFIED] = checked.get(schema.VERIFIED) if row.get(schema.REFERENCE) else None
    # then the large model
    if flat and scorer != "none":
        if scorer_model is None:
            raise ValueError("select: scorer_model is required for scorer perplexity or judge")
        candidates_ds = ray.data.from_arrow(pa.Table.from_pylist(flat))
        if scorer == "perplexity":
            scored = candidates_ds.map_batches(PerplexityScorer, fn_constructor_kwargs=dict(
                model=scorer_model, cache_dir=cache_dir), batch_size=16, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=resources.concurrency), num_cpus=resources.cpus_per_actor,
                num_gpus=resources.gpus_per_actor)
        else:
            scored = candidates_ds.map_batches(JudgeScorer, fn_constructor_kwargs=dict(
                model=scorer_model, engine=(scorer_engine or EngineConfig()).model_dump(), cache_dir=cache_dir),
                batch_size=16, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
                num_cpus=resources.cpus_per_actor, num_gpus=resources.gpus_per_actor)
        flat = collect(scored).to_pylist()
    else:
        for row in flat:
            row["score"] = 0.0

    per_id: dict[str, list[dict[str, Any]]] = {}
    for row in flat:
        per_id.setdefault(row[schema.ID], []).append(row)
    decision: dict[str, dict[str, Any]] = {}
    pairs = 0
    for i in sorted(by_id, key=natural_key):
        cands = per_id.get(i, [])
        if not cands:
            for row in by_id[i]:
                log.reject("select", row, "no candidate response (no reference, teacher or student text)")
            continue
        # verified beats unverified beats unknown is not needed: unknown (no reference) ranks as unverified
        ranked = sorted(cands, key=lambda c: (bool(c.get(schema.VERIFIED)), c["score"] if np.isfinite(c["score"]) else -1e30,
                                              c["source"]), reverse=True)
        best, worst = ranked[0], ranked[-1]
        has_pair = len(ranked) > 1 and (bool(best.get(schema.VERIFIED)), best["score"]) != (bool(worst.get(schema.VERIFIED)), worst["score"])
        pairs += has_pair
        decision[i] = {
            schema.BEST: best["text"], schema.BEST_SOURCE: best["source"],
            schema.WORST: worst["text"] if has_pair else None, schema.WORST_SOURCE: worst["source"] if has_pair else None,
            schema.CANDIDATES: [{"source": c["source"], "text": c["text"], "verified": c.get(schema.VERIFIED),
                            "score": c["score"] if np.isfinite(c["score"]) else None} for c in ranked],
            "sample": by_id[i][0].get(schema.SAMPLE_INDEX),
        }

    selected = attach_decisions(dataset, decision, schema.SELECT_COLUMNS)
    best_sources: dict[str, int] = {}
    for d in decision.values():
        key = d[schema.BEST_SOURCE].split("#")[0]
        best_sources[key] = best_sources.get(key, 0) + 1
    log.report("select", {
        "scorer": scorer,
        "scorer_model": scorer_model,
        "prompts_in": len(by_id),
        "prompts_out": len(decision),
        "candidates": len(flat),
        "unscored": sum(1 for row in flat if row.get(schema.ERROR)),
        "unscored_first": next((f"{row[schema.ID]}: {row[schema.ERROR]}" for row in flat if row.get(schema.ERROR)), None),
        "pairs": pairs,
        "best_by_source": best_sources,
        "seconds": round(time.perf_counter() - started, 3),
    })
    return selected
