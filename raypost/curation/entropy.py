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
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from raypost import schema
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.curation.config import DEFAULT_ANSWER_PROMPT
from raypost.curation.sources import ResponseSource
from raypost.curation.rows import CurationLog, attach_decisions, batch_rows, collect, column_names, natural_key, question_text, rows_table

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
    """
    log = log if log is not None else CurationLog()
    teacher = teacher or ResponseSource("teacher")
    started = time.perf_counter()
    dataset = dataset.materialize()
    names = column_names(dataset)
    light_columns = [c for c in (schema.ID, schema.SAMPLE_INDEX, schema.MESSAGES, schema.REFERENCE, schema.RESPONSE,
                                 schema.COMPLETION_TOKENS, schema.VERIFIED, schema.VERIFY_REASON) if c in names]
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in collect(dataset, light_columns).to_pylist():
        by_id.setdefault(str(row[schema.ID]), []).append(row)

    score, scoring_seconds = _student_scores(by_id, model=model, engine=engine, answer_prompt=answer_prompt,
                                             max_tokens=answer_max_tokens, resources=resources, cache_dir=cache_dir,
                                             signal=signal, cot_max_tokens=cot_max_tokens)
    failed = {i for i in by_id if score.get(i, {}).get(schema.ENTROPY) is None}
    for i in failed:
        for row in by_id[i]:
            log.reject("entropy_route", row, f"student scoring failed: {score.get(i, {}).get(schema.ERROR) or 'no output'}")
    ids = [i for i in sorted(by_id, key=natural_key) if i not in failed]
    if not ids:
        log.report("entropy_route", {"prompts_in": len(by_id), "prompts_out": 0, "scoring_failed": len(failed)})
        return dataset.limit(0)

    # quantile thresholds over the whole dataset
    low, high = difficulty_thresholds([score[i][schema.ENTROPY_NORMALIZED] for i in ids], low_quantile, high_quantile)
    difficulty = {i: difficulty_of(score[i][schema.ENTROPY_NORMALIZED], low, high) for i in ids}
    correct = {i: _student_correct(score[i][schema.STUDENT_ANSWER], by_id[i][0].get(schema.REFERENCE),
                                   answer_only=signal == "first_token") for i in ids}
    hard = [i for i in ids if difficulty[i] == "hard"]

    # the teacher's chain of thought: generated for hard prompts only; read for all when it
    # exists already (what the others did not need is the saving)
    cot_candidates, generated_tokens = teacher.responses(
        by_id, ids if teacher.from_ in ("input", "stage") else hard, resources=resources, cache_dir=cache_dir,
        progress="curate: teacher chain of thought")
    if require_verified_cot:
        for i in hard:
            _verify_candidates(cot_candidates.get(i, []))

    decision, cot_tokens = _choose_targets(ids, by_id, score, difficulty, correct, cot_candidates, teacher,
                                           require_verified_cot, short_answer_template, log)
    routed = attach_decisions(dataset, decision, schema.ROUTE_COLUMNS)
    counts = {d: sum(1 for i in ids if difficulty[i] == d) for d in ("easy", "medium", "hard")}
    checked = [i for i in ids if correct[i] is not None]
    log.report("entropy_route", {
        "model": model,
        "prompts_in": len(by_id),
        "prompts_out": len(decision),
        "scoring_failed": len(failed),
        "quantiles": [low_quantile, high_quantile],
        "thresholds": [low, high],
        "split": counts,
        "student_accuracy": round(sum(1 for i in checked if correct[i]) / len(checked), 4) if checked else None,
        "student_accuracy_by_difficulty": {
            d: (round(sum(1 for i in checked if difficulty[i] == d and correct[i])
                      / max(1, sum(1 for i in checked if difficulty[i] == d)), 4)) for d in counts},
        "signal": signal,
        "entropy_roc_auc": entropy_auc([score[i][schema.ENTROPY] for i in ids], [correct[i] for i in ids]),
        "signal_roc_auc": {name: entropy_auc([score[i][schema.SIGNALS][name] for i in ids], [correct[i] for i in ids])
                           for name in schema.ROUTING_SIGNALS
                           if any(score[i][schema.SIGNALS][name] is not None for i in ids)},
        "auc_prompts": len(checked),
        "teacher_source": teacher.from_,
        **_savings(ids, difficulty, cot_candidates, cot_tokens, generated_tokens, teacher),
        "collapsed_samples": sum(len(by_id[i]) - 1 for i in decision),
        "scoring_seconds": round(scoring_seconds, 3),
        "scoring_rows_per_second": round(len(by_id) / scoring_seconds, 3) if scoring_seconds else None,
        "seconds": round(time.perf_counter() - started, 3),
    })
    return routed


def _student_scores(by_id: dict[str, list[dict[str, Any]]], *, model, engine, answer_prompt, max_tokens, resources,
                    cache_dir, signal, cot_max_tokens) -> tuple[dict[str, dict[str, Any]], float]:
    """The student's entropy (and short answer), one row per prompt, on engine actors."""
    import ray

    units = [{schema.ID: i, schema.MESSAGES: rows[0][schema.MESSAGES]} for i, rows in by_id.items()]
    started = time.perf_counter()
    scored = collect(score_entropy(ray.data.from_arrow(pa.Table.from_pylist(units)), model=model, engine=engine,
                                   answer_prompt=answer_prompt, max_tokens=max_tokens, resources=resources,
                                   cache_dir=cache_dir, signal=signal, cot_max_tokens=cot_max_tokens)).to_pylist()
    return {str(r[schema.ID]): r for r in scored}, time.perf_counter() - started


def _choose_targets(ids, by_id, score, difficulty, correct, cot_candidates, teacher: ResponseSource,
                    require_verified_cot: bool, short_answer_template: str, log: CurationLog):
    """One target per prompt: a verified chain of thought for a hard one, the short answer for
    the rest; a prompt that has neither is set aside with the reason."""
    decision: dict[str, dict[str, Any]] = {}
    cot_tokens: dict[str, int | None] = {}
    for i in ids:
        base = dict(by_id[i][0])
        if difficulty[i] == "hard":
            chosen, why = _pick_cot(cot_candidates.get(i, []), require_verified_cot)
            if chosen is None:
                for row in by_id[i]:
                    log.reject("entropy_route", row, why)
                continue
            target, source = chosen[schema.RESPONSE], "teacher_cot"
            cot_tokens[i] = chosen.get(schema.COMPLETION_TOKENS)
            if teacher.from_ == "input":
                base = dict(chosen)
        else:
            target = _short_answer(base.get(schema.REFERENCE), short_answer_template)
            source = "short_answer"
            if target is None:
                for row in by_id[i]:
                    log.reject("entropy_route", row, f"{difficulty[i]} prompt: no final answer in the reference "
                                                     "to use as the short answer")
                continue
        decision[i] = {
            "sample": base.get(schema.SAMPLE_INDEX),
            schema.ENTROPY: score[i][schema.ENTROPY],
            schema.ENTROPY_NORMALIZED: score[i][schema.ENTROPY_NORMALIZED],
            schema.SIGNALS: score[i][schema.SIGNALS],
            schema.STUDENT_ANSWER: score[i][schema.STUDENT_ANSWER],
            schema.STUDENT_CORRECT: correct[i],
            schema.DIFFICULTY: difficulty[i],
            schema.TARGET: target,
            schema.TARGET_SOURCE: source,
        }
    return decision, cot_tokens


def _savings(ids, difficulty, cot_candidates, cot_tokens, generated_tokens, teacher: ResponseSource) -> dict[str, Any]:
    """What routing saved: the chain of thought that easy and medium prompts did not need."""
    easy_medium = [i for i in ids if difficulty[i] != "hard"]
    unused_cot_tokens, estimated = None, False
    if teacher.from_ in ("input", "stage"):
        per_prompt = []
        for i in easy_medium:
            known = [c.get(schema.COMPLETION_TOKENS) for c in cot_candidates.get(i, []) if c.get(schema.COMPLETION_TOKENS)]
            if known:
                per_prompt.append(min(known))
        unused_cot_tokens = int(sum(per_prompt)) if per_prompt else None
    used = [t for t in cot_tokens.values() if t]
    used_tokens = generated_tokens if generated_tokens is not None else (int(sum(used)) if used else None)
    if unused_cot_tokens is None and used:
        unused_cot_tokens, estimated = int(np.mean(used) * len(easy_medium)), True
    return {
        "cot_prompts_used": len(ids) - len(easy_medium),
        "cot_prompts_saved": len(easy_medium),
        "cot_prompts_saved_fraction": round(len(easy_medium) / len(ids), 4),
        "cot_tokens_used": used_tokens,
        "cot_tokens_saved": unused_cot_tokens,
        "cot_tokens_saved_estimated": estimated,
    }
