"""Entropy routing, after "Complexity-aware fine-tuning" (arXiv 2506.21220).

The student is asked for the final answer only, greedily; the Shannon entropy of its
full-vocabulary softmax at the first generated token (exact, from the transformers engine)
ranks prompts by difficulty. Normalized by ln(vocabulary size) and cut at quantiles (25th and
75th by default) it gives easy / medium / hard. Only hard prompts get the teacher's chain of
thought as the training target; easy and medium ones get the short answer. The paper reports
entropy predicting the student's errors with ROC AUC 0.73 and 81% less distillation data; we
report the AUC and the savings measured on the data given.

`signal` picks what ranks difficulty: `first_token` (the paper's), or one of three read from the
student's own greedy chain of thought on the prompt as given (one pass measures all three):
`max_cot_entropy` (its most uncertain token), `mean_cot_entropy`, `loss` (mean token loss of its
own answer). On the testbed at 135M the first token predicted errors weakly (AUC 0.56-0.65) and the
chain of thought's maximum entropy well (0.82-0.84 within a level). The student is then checked on
the answer its pass gave (the short reply, or the chain of thought's final answer); the report
gives every measured signal's AUC against that.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa

from raypost import schema
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.curation.config import DEFAULT_ANSWER_PROMPT
from raypost.curation.sources import ResponseSource
from raypost.curation.rows import (LIGHT_CPUS, CurationLog, attach, batch_rows, by_id, column_names,
                                   first_samples, id_groups, join_partitions, materialized, question_text, rows_table,
                                   with_columns)

def answer_only_messages(messages: list[dict[str, str]], answer_prompt: str = DEFAULT_ANSWER_PROMPT) -> list[dict[str, str]]:
    """The question alone, re-asked for its final answer (the original system prompt may ask for steps)."""
    return [{"role": "user", "content": answer_prompt.format(question=question_text(messages))}]


def cot_signals(completion) -> dict[str, float | None]:
    """The chain-of-thought signals of one greedy completion (exact token entropies, the chosen
    tokens' log-probabilities)."""
    entropies = completion.token_entropies or []
    losses = [-t.logprob for t in completion.logprobs or []]
    return {"first_token": None,
            "max_cot_entropy": max(entropies) if entropies else None,
            "mean_cot_entropy": sum(entropies) / len(entropies) if entropies else None,
            "loss": sum(losses) / len(losses) if losses else None}


class EntropyScorer:
    """Ray Data actor: the student's greedy reply and the routing signal it gives: the answer-only
    reply's first-token entropy, or its own chain of thought's signals."""

    def __init__(self, model: str, engine: dict[str, Any], answer_prompt: str, max_tokens: int, cache_dir: str | None,
                 signal: str = "first_token", cot_max_tokens: int = 256):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from raypost.engines import build_engine

        config = EngineConfig.model_validate({**engine, "backend": "transformers"})
        self.engine = build_engine(model, config, cache_dir)
        self.log_vocab = math.log(self.engine.hf_model.config.vocab_size)
        self.signal = signal
        if signal == "first_token":
            self.sampling = SamplingConfig(temperature=0.0, max_tokens=max_tokens, first_token_entropy=True)
        else:
            self.sampling = SamplingConfig(temperature=0.0, max_tokens=cot_max_tokens, token_entropies=True, logprobs=0)
        self.answer_prompt = answer_prompt

    def _messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        return answer_only_messages(messages, self.answer_prompt) if self.signal == "first_token" else list(messages)

    def __call__(self, batch) -> pa.Table:
        from raypost.engines import Request

        rows = batch_rows(batch)
        requests = [Request(str(r[schema.ID]), self._messages(r[schema.MESSAGES])) for r in rows]
        from raypost.engines import generate_each

        outputs = [out if isinstance(out, str) else out[0] for out in generate_each(self.engine, requests, self.sampling)]
        for row, out in zip(rows, outputs):
            failed = isinstance(out, str)
            signals = None
            if not failed:
                signals = ({**dict.fromkeys(schema.ROUTING_SIGNALS), "first_token": out.first_token_entropy}
                           if self.signal == "first_token" else cot_signals(out))
            value = None if failed else signals[self.signal]
            row[schema.ENTROPY] = value
            row[schema.ENTROPY_NORMALIZED] = None if value is None else value / self.log_vocab
            row[schema.SIGNALS] = signals
            row[schema.STUDENT_ANSWER] = None if failed else out.text
            row[schema.ERROR] = out if failed else None
        return rows_table(rows, batch.schema if isinstance(batch, pa.Table) else None, schema.SCORE_COLUMNS)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def score_entropy(dataset, *, model: str, engine: EngineConfig | None = None, answer_prompt: str = DEFAULT_ANSWER_PROMPT,
                  max_tokens: int = 16, resources: Resources | None = None, cache_dir: str | None = None,
                  signal: str = "first_token", cot_max_tokens: int = 256):
    """Add `entropy` (the routing signal, nats), `entropy_normalized` (/ ln V), `signals` (every
    signal the pass measured), `student_answer`, `error` to each row.

    Pass one row per prompt. With `first_token`, max_tokens only bounds the answer text kept for
    checking the student (1 is enough for routing alone); the CoT signals read up to
    `cot_max_tokens` of the student's own reasoning.
    """
    import ray

    engine = engine or EngineConfig(backend="transformers")
    resources = resources or Resources()
    return dataset.map_batches(
        EntropyScorer,
        fn_constructor_kwargs=dict(model=model, engine=engine.model_dump(), answer_prompt=answer_prompt,
                                   max_tokens=max_tokens, cache_dir=cache_dir, signal=signal,
                                   cot_max_tokens=cot_max_tokens),
        batch_size=engine.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor,
    )


def difficulty_thresholds(values: list[float], low_quantile: float, high_quantile: float) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(np.quantile(array, low_quantile)), float(np.quantile(array, high_quantile))


def difficulty_of(value: float, low: float, high: float) -> str:
    return "easy" if value <= low else "hard" if value > high else "medium"


def entropy_auc(entropies: list[float], correct: list[bool | None]) -> float | None:
    """ROC AUC of entropy as a predictor of the student being wrong (None if only one class)."""
    from sklearn.metrics import roc_auc_score

    pairs = [(e, not c) for e, c in zip(entropies, correct) if c is not None and e is not None]
    if len({wrong for _, wrong in pairs}) < 2:
        return None
    return float(roc_auc_score([w for _, w in pairs], [e for e, _ in pairs]))


def _short_answer(reference: str | None, template: str) -> str | None:
    from raypost.verify.math_answer import reference_answer

    if not reference:
        return None
    answer = reference_answer(reference)
    return None if answer is None or str(answer).strip() == "" else template.format(answer=answer)


def _student_correct(answer: str | None, reference: str | None, answer_only: bool = True) -> bool | None:
    """The student's reply checked against the reference.

    An answer-only reply counts by its first paragraph with a number: a small model that has
    answered often goes on to invent the next question (a few-shot prompt invites it), whose
    numbers are not its answer. A chain of thought counts by its final answer.
    """
    from raypost.verify.math_answer import verify_math

    if reference is None or answer is None:
        return None
    if not answer_only:
        return bool(verify_math(answer, reference)[0])
    paragraphs = [p for p in answer.split("\n\n") if any(ch.isdigit() for ch in p)]
    return bool(verify_math(paragraphs[0] if paragraphs else answer, reference)[0])


def _pick_cot(candidates: list[dict[str, Any]], require_verified: bool) -> tuple[dict[str, Any] | None, str]:
    """The teacher response to train on: a verified one first, then the lowest sample index."""
    with_text = [c for c in candidates if (c.get(schema.RESPONSE) or "").strip()]
    if not with_text:
        return None, "hard prompt: no teacher chain of thought"
    if require_verified:
        checked = [c for c in with_text if c.get(schema.VERIFIED)]
        if not checked:
            reasons = sorted({str(c.get(schema.VERIFY_REASON)) for c in with_text})
            return None, f"hard prompt: no teacher chain of thought passed verification ({'; '.join(reasons)[:200]})"
        with_text = checked
    return min(with_text, key=lambda c: c.get(schema.SAMPLE_INDEX) or 0), ""


def _verify_candidates(candidates: list[dict[str, Any]]) -> None:
    from raypost.verify.math_answer import verify_math

    for c in candidates:
        if schema.VERIFIED not in c or c[schema.VERIFIED] is None:
            if c.get(schema.REFERENCE) and c.get(schema.RESPONSE):
                c[schema.VERIFIED], c[schema.VERIFY_REASON] = verify_math(c[schema.RESPONSE], c[schema.REFERENCE])
            else:
                c[schema.VERIFIED], c[schema.VERIFY_REASON] = False, "no reference or response"


# what the per-prompt pick of a chain of thought reads of each candidate response
CANDIDATE_COLUMNS = {schema.ID: pa.string(), schema.SAMPLE_INDEX: pa.int32(), schema.RESPONSE: pa.string(),
                     schema.COMPLETION_TOKENS: pa.int32(), schema.VERIFIED: pa.bool_(),
                     schema.VERIFY_REASON: pa.string(), schema.REFERENCE: pa.string()}
PICK_COLUMNS = {"_cot_sample": pa.int32(), "_cot_text": pa.string(), "_cot_tokens": pa.int64(), "_cot_why": pa.string(),
                "_min_tokens": pa.int64()}
# per prompt, summed into the report (the driver receives the sums)
TALLY_COLUMNS = ("_kept", "_hard", "_easy_medium", "_collapsed", "_cot_tokens_used", "_cot_known", "_saved_tokens",
                 "_saved_known")
DECISION_COLUMNS = {"_sample": pa.int32(), **schema.ROUTE_COLUMNS, "_why": pa.string(),
                    **{c: pa.int64() for c in TALLY_COLUMNS}}


def entropy_route(dataset, *, model: str, engine: EngineConfig | None = None, answer_prompt: str = DEFAULT_ANSWER_PROMPT,
                  answer_max_tokens: int = 16, low_quantile: float = 0.25, high_quantile: float = 0.75,
                  teacher: ResponseSource | None = None, short_answer_template: str = "#### {answer}",
                  require_verified_cot: bool = True, resources: Resources | None = None,
                  cache_dir: str | None = None, log: CurationLog | None = None, signal: str = "first_token",
                  cot_max_tokens: int = 256):
    """Score prompts by the student's `signal` (first-token entropy by default), label difficulty,
    pick each training target.

    Returns one row per prompt id with `entropy`, `entropy_normalized`, `student_answer`,
    `student_correct`, `difficulty` (easy/medium/hard), `target` (the text to train on) and
    `target_source` (teacher_cot / short_answer). Report: thresholds, split, ROC AUC, savings.

    Every row stays on the workers: one prompt per id (a Ray Data hash repartition on id), the
    student's scoring on engine actors, the teacher's chain of thought from its source (generated
    for hard prompts only, through the generation stage), the pick per prompt (repartitioned on
    id again) and the decision joined back to the rows (a Ray Data join). The quantile thresholds
    and the ROC AUCs need every prompt's signal: one task on a worker holds a few numbers per
    prompt for them.
    The driver receives the report's numbers.
    """
    import ray

    log = log if log is not None else CurationLog()
    teacher = teacher or ResponseSource("teacher")
    started = time.perf_counter()
    dataset = dataset.materialize()
    if not dataset.count():
        log.report("entropy_route", {"model": model, "prompts_in": 0, "prompts_out": 0})
        return dataset
    names = column_names(dataset)
    units = first_samples(dataset, [c for c in (schema.ID, schema.SAMPLE_INDEX, schema.MESSAGES, schema.REFERENCE)
                                    if c in names])
    light = dict(batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    scoring_started = time.perf_counter()
    scored = score_entropy(units, model=model, engine=engine, answer_prompt=answer_prompt, max_tokens=answer_max_tokens,
                           resources=resources, cache_dir=cache_dir, signal=signal, cot_max_tokens=cot_max_tokens)
    scored = scored.map_batches(_check_student, **light, fn_kwargs=dict(answer_only=signal == "first_token"))
    scored = scored.drop_columns([schema.MESSAGES]).materialize()
    scoring_seconds = time.perf_counter() - scoring_started
    numbers = ray.get(ray.remote(route_numbers).options(num_cpus=LIGHT_CPUS).remote(
        low_quantile, high_quantile, *scored.select_columns(
            [schema.ENTROPY, schema.ENTROPY_NORMALIZED, schema.SIGNALS, schema.STUDENT_CORRECT]).to_arrow_refs()))
    prompts_in, partitions = numbers.pop("prompts_in"), join_partitions(numbers["prompts_scored"])
    low, high = numbers["thresholds"] or (0.0, 0.0)
    labeled = materialized(scored.map_batches(_label, **light, fn_kwargs=dict(low=low, high=high)))

    # the teacher's chain of thought: generated for hard prompts only; read for all when it
    # exists already (what the others did not need is the saving)
    asked = units if teacher.from_ != "generate" else units.join(
        materialized(labeled.filter(lambda r: r[schema.DIFFICULTY] == "hard").select_columns([schema.ID])), "left_semi",
        num_partitions=partitions, on=(schema.ID,))
    responses, generated_tokens = teacher.dataset(dataset, asked, resources=resources, cache_dir=cache_dir,
                                                  progress="curate: teacher chain of thought")
    picks = by_id(responses.map_batches(with_columns, **light, fn_kwargs=dict(columns=CANDIDATE_COLUMNS)),
                  _pick_for_prompts, partitions, require_verified=require_verified_cot)
    decisions = labeled.join(materialized(picks), "left_outer", num_partitions=partitions, on=(schema.ID,)).map_batches(
        _decide, **light, fn_kwargs=dict(teacher_from=teacher.from_, short_answer_template=short_answer_template)
    ).materialize()
    routed = attach(dataset, decisions, schema.ROUTE_COLUMNS, "entropy_route", log, partitions)

    sums = decisions.sum(list(TALLY_COLUMNS)) or {}
    tally = {c: int(sums.get(f"sum({c})") or 0) for c in TALLY_COLUMNS}
    log.report("entropy_route", {
        "model": model,
        "prompts_in": prompts_in,
        "prompts_out": tally["_kept"],
        "scoring_failed": prompts_in - numbers.pop("prompts_scored"),
        "quantiles": [low_quantile, high_quantile],
        **numbers,
        "signal": signal,
        "teacher_source": teacher.from_,
        **_savings(tally, generated_tokens, teacher),
        "collapsed_samples": tally["_collapsed"],
        "scoring_seconds": round(scoring_seconds, 3),
        "scoring_rows_per_second": round(prompts_in / scoring_seconds, 3) if scoring_seconds else None,
        "seconds": round(time.perf_counter() - started, 3),
    })
    return routed


def route_numbers(low_quantile: float, high_quantile: float, *tables: pa.Table) -> dict[str, Any]:
    """The global part of routing, in one task: the quantile thresholds over every prompt's
    signal, the split, the student's accuracy per difficulty and each signal's ROC AUC."""
    rows = [r for t in tables if t.num_rows for r in t.to_pylist()]
    scored = [r for r in rows if r[schema.ENTROPY_NORMALIZED] is not None]
    numbers: dict[str, Any] = {"prompts_in": len(rows), "prompts_scored": len(scored)}
    if not scored:
        return {**numbers, "thresholds": None}
    low, high = difficulty_thresholds([r[schema.ENTROPY_NORMALIZED] for r in scored], low_quantile, high_quantile)
    difficulty = [difficulty_of(r[schema.ENTROPY_NORMALIZED], low, high) for r in scored]
    correct = [r[schema.STUDENT_CORRECT] for r in scored]
    counts = {d: difficulty.count(d) for d in ("easy", "medium", "hard")}
    checked = [(d, c) for d, c in zip(difficulty, correct) if c is not None]
    return {
        **numbers,
        "thresholds": [low, high],
        "split": counts,
        "student_accuracy": round(sum(c for _, c in checked) / len(checked), 4) if checked else None,
        "student_accuracy_by_difficulty": {
            d: round(sum(1 for e, c in checked if e == d and c) / max(1, sum(1 for e, _ in checked if e == d)), 4)
            for d in counts},
        "entropy_roc_auc": entropy_auc([r[schema.ENTROPY] for r in scored], correct),
        "signal_roc_auc": {name: entropy_auc([r[schema.SIGNALS][name] for r in scored], correct)
                           for name in schema.ROUTING_SIGNALS
                           if any(r[schema.SIGNALS][name] is not None for r in scored)},
        "auc_prompts": len(checked),
    }


def _check_student(batch: pa.Table, *, answer_only: bool) -> pa.Table:
    """Ray Data batch function: `student_correct`, the student's reply checked against the reference."""
    correct = [_student_correct(answer, reference, answer_only=answer_only) for answer, reference in zip(
        batch.column(schema.STUDENT_ANSWER).to_pylist(), (batch.column(schema.REFERENCE).to_pylist()
                                                          if schema.REFERENCE in batch.column_names
                                                          else [None] * batch.num_rows))]
    return batch.append_column(schema.STUDENT_CORRECT, pa.array(correct, pa.bool_()))


def _label(batch: pa.Table, *, low: float, high: float) -> pa.Table:
    """Ray Data batch function: `difficulty` by the thresholds (null where the student gave no signal)."""
    labels = [None if e is None else difficulty_of(e, low, high)
              for e in batch.column(schema.ENTROPY_NORMALIZED).to_pylist()]
    return batch.append_column(schema.DIFFICULTY, pa.array(labels, pa.string()))


def _pick_for_prompts(block: pa.Table, *, require_verified: bool) -> pa.Table:
    """`by_id` block function: each prompt's candidate responses -> the chain of thought it would
    train on (or why none), and the fewest completion tokens any of them took (the saving, when
    the prompt turns out not to need one)."""
    out = []
    for candidates in id_groups(block):
        if require_verified:
            _verify_candidates(candidates)
        chosen, why = _pick_cot(candidates, require_verified)
        known = [c[schema.COMPLETION_TOKENS] for c in candidates if c.get(schema.COMPLETION_TOKENS)]
        out.append({
            schema.ID: candidates[0][schema.ID],
            "_cot_sample": None if chosen is None else chosen.get(schema.SAMPLE_INDEX),
            "_cot_text": None if chosen is None else chosen[schema.RESPONSE],
            "_cot_tokens": None if chosen is None else chosen.get(schema.COMPLETION_TOKENS),
            "_cot_why": why or None,
            "_min_tokens": min(known) if known else None,
        })
    return pa.Table.from_pylist(out, schema=pa.schema([(schema.ID, pa.string()), *PICK_COLUMNS.items()]))


def _decide(batch: pa.Table, *, teacher_from: str, short_answer_template: str) -> pa.Table:
    """Ray Data batch function: each prompt (its scores and its pick joined) -> its decision: the
    sample kept and its target, or why the prompt is set aside; plus the tallies of the report."""
    out = []
    for row in batch.to_pylist():
        difficulty = row[schema.DIFFICULTY]
        decision = {schema.ID: row[schema.ID], "_sample": row.get(schema.SAMPLE_INDEX),
                    **{c: row.get(c) for c in schema.ROUTE_COLUMNS}, **dict.fromkeys(TALLY_COLUMNS, 0)}
        why, target, source = None, None, None
        if difficulty is None:
            why = f"student scoring failed: {row.get(schema.ERROR) or 'no output'}"
        elif difficulty == "hard":
            decision["_hard"] = 1
            if row.get("_cot_text") is None:
                why = row.get("_cot_why") or "hard prompt: no teacher chain of thought"
            else:
                target, source = row["_cot_text"], "teacher_cot"
                decision["_cot_tokens_used"] = row.get("_cot_tokens") or 0
                decision["_cot_known"] = int(bool(row.get("_cot_tokens")))
                if teacher_from == "input":  # the row kept is the chosen response's own
                    decision["_sample"] = row.get("_cot_sample")
        else:
            decision["_easy_medium"] = 1
            decision["_saved_tokens"] = row.get("_min_tokens") or 0
            decision["_saved_known"] = int(bool(row.get("_min_tokens")))
            target, source = _short_answer(row.get(schema.REFERENCE), short_answer_template), "short_answer"
            if target is None:
                why = f"{difficulty} prompt: no final answer in the reference to use as the short answer"
        decision.update({schema.TARGET: target, schema.TARGET_SOURCE: None if why else source, "_why": why,
                         "_kept": int(why is None), "_collapsed": (row.get("_rows") or 1) - 1 if why is None else 0})
        out.append(decision)
    return pa.Table.from_pylist(out, schema=pa.schema([(schema.ID, pa.string()), *DECISION_COLUMNS.items()]))


def _savings(tally: dict[str, int], generated_tokens: int | None, teacher: ResponseSource) -> dict[str, Any]:
    """What routing saved: the chain of thought that easy and medium prompts did not need."""
    easy_medium, hard = tally["_easy_medium"], tally["_hard"]
    unused_cot_tokens, estimated = None, False
    if teacher.from_ in ("input", "stage") and tally["_saved_known"]:
        unused_cot_tokens = tally["_saved_tokens"]
    used_tokens = generated_tokens if generated_tokens is not None else (tally["_cot_tokens_used"] or None)
    if unused_cot_tokens is None and tally["_cot_known"]:
        unused_cot_tokens, estimated = int(tally["_cot_tokens_used"] / tally["_cot_known"] * easy_medium), True
    return {
        "cot_prompts_used": hard,
        "cot_prompts_saved": easy_medium,
        "cot_prompts_saved_fraction": round(easy_medium / (hard + easy_medium), 4) if hard + easy_medium else None,
        "cot_tokens_used": used_tokens,
        "cot_tokens_saved": unused_cot_tokens,
        "cot_tokens_saved_estimated": estimated,
    }
