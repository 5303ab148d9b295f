"""Curation speed and entropy-routing quality.

    python bench/curation.py [--entropy-rows 200] [--model packaged:smollm2-135m-instruct]

Measures, on a local Ray:
- dedup rows/s at 10k and 20k rows (GSM8K questions plus planted exact and near duplicates);
  the global near-duplicate pass must grow sub-quadratically (time at 20k <= 2.5x time at 10k),
  and is compared with brute-force all-pairs signature comparison measured at 2k rows;
- entropy-scoring rows/s (first-token entropy only, max_tokens=1) with the student;
- the ROC AUC of that entropy as a predictor of the student's answer-only output being wrong,
  on a GSM8K slice (arXiv 2506.21220 reports 0.73 for its models and data), with a bootstrap
  95% interval. With `--shots K` the answer-only prompt shows K solved questions, answers only
  (the shortest of the last 50 GSM8K train items, away from the slice): a 135M model asked for "the final
  answer only" rarely starts with a number, so its first token says little about the answer.

Prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def load_gsm8k(limit: int | None = None) -> list[dict]:
    rows = []
    with open(GSM8K) as handle:
        for line in handle:
            rows.append(json.loads(line))
            if limit and len(rows) >= limit:
                break
    return rows


def dedup_rows(problems: list[dict], n: int, seed: int = 0) -> list[dict]:
    """n prompt rows: real questions, then variants of them (numbers changed: near duplicates;
    re-spaced and re-cased: exact duplicates after normalization)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n):
        question = problems[k % len(problems)]["question"]
        if k >= len(problems):
            if rng.random() < 0.3:
                question = "  " + question.upper()
            else:
                question = re.sub(r"\d+", lambda m: str(int(m.group()) + int(rng.integers(1, 9))), question, count=1)
        rows.append({"id": f"row-{k}", "messages": [{"role": "user", "content": question}]})
    return rows


def time_dedup(rows: list[dict]) -> dict:
    from raypost.curation import CurationLog, dataset_from_rows, dedup

    log = CurationLog()
    dataset = dataset_from_rows(rows).materialize()
    started = time.perf_counter()
    dedup(dataset, log=log)
    seconds = time.perf_counter() - started
    report = log.reports["dedup"]
    return {"rows": len(rows), "seconds": round(seconds, 3), "rows_per_second": round(len(rows) / seconds, 1),
            "near_dup_pass_seconds": report["lsh_seconds"],
            "signature_seconds": round(report["seconds"] - report["lsh_seconds"], 3),
            "removed": report["units_removed"], "exact_removed": report["exact_units_removed"]}


def brute_force_seconds(rows: list[dict]) -> tuple[float, float]:
    """All-pairs estimated-Jaccard comparison of the same signatures, and the LSH pass, on `rows`."""
    from datasketch import MinHash

    from raypost.curation.dedup import find_duplicates, normalize_text, shingles

    texts = [normalize_text(r["messages"][0]["content"]) for r in rows]
    signatures = np.stack([m.hashvalues.astype(np.uint64) for m in MinHash.bulk([shingles(t) for t in texts],
                                                                                 num_perm=128, seed=1)])
    started = time.perf_counter()
    for i in range(1, len(signatures)):
        (signatures[:i] == signatures[i]).mean(axis=1) >= 0.8
    brute = time.perf_counter() - started
    started = time.perf_counter()
    find_duplicates([r["id"] for r in rows], texts, signatures, threshold=0.8, exact=False)
    return brute, time.perf_counter() - started


def few_shot_answer_prompt(shots: int) -> str:
    """An answer-only prompt with `shots` solved GSM8K questions from the end of the train file."""
    from raypost.curation.entropy import DEFAULT_ANSWER_PROMPT
    from raypost.verify.math_answer import reference_answer

    if shots == 0:
        return DEFAULT_ANSWER_PROMPT
    examples = sorted(load_gsm8k()[-50:], key=lambda e: len(e["question"]))[:shots]  # short ones: prefill is the cost
    blocks = [f"Question: {e['question']}\nAnswer: {reference_answer(e['answer'])}" for e in examples]
    text = "\n\n".join(blocks).replace("{", "{{").replace("}", "}}")
    return "Answer each question with the final number only.\n\n" + text + "\n\nQuestion: {question}\nAnswer:"


def bootstrap_auc(entropies: list[float], wrong: list[bool], rounds: int = 1000, seed: int = 0) -> list[float] | None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    entropies, wrong = np.asarray(entropies), np.asarray(wrong)
    values = []
    for _ in range(rounds):
        pick = rng.integers(0, len(wrong), len(wrong))
        if wrong[pick].min() != wrong[pick].max():
            values.append(roc_auc_score(wrong[pick], entropies[pick]))
    return [round(float(np.percentile(values, 2.5)), 4), round(float(np.percentile(values, 97.5)), 4)] if values else None


def entropy_bench(model: str, n: int, shots: int, scoring_rows: int) -> dict:
    import ray

    from raypost.config import EngineConfig
    from raypost.curation import CurationLog, dataset_from_rows, entropy_route, score_entropy
    from raypost.curation.rows import collect
    from raypost.models import resolve_model

    path = str(resolve_model(model))
    answer_prompt = few_shot_answer_prompt(shots)
    problems = load_gsm8k(n)
    rows = [{"id": f"gsm8k-{i}", "messages": [{"role": "user", "content": p["question"]}], "reference": p["answer"],
             "response": p["answer"], "sample_index": 0} for i, p in enumerate(problems)]
    engine = EngineConfig(backend="transformers", batch_size=16)
    # scoring alone: one greedy token per prompt, exact full-vocabulary entropy
    units = ray.data.from_items([{"id": r["id"], "messages": r["messages"]} for r in rows[:16]])
    collect(score_entropy(units, model=path, engine=engine, max_tokens=1,
                          answer_prompt=answer_prompt))  # warm: actor start-up and model load
    started = time.perf_counter()
    scored = collect(score_entropy(dataset_from_rows([{k: r[k] for k in ("id", "messages")}
                                                      for r in rows[:scoring_rows]]),
                                   model=path, engine=engine, max_tokens=1, answer_prompt=answer_prompt))
    scoring_seconds = time.perf_counter() - started
    # routing with the student's answer (16 tokens) checked against the reference, for the AUC
    log = CurationLog()
    routed = collect(entropy_route(dataset_from_rows(rows), model=path, engine=engine, answer_max_tokens=16,
                                   answer_prompt=answer_prompt, require_verified_cot=False, log=log),
                     ["entropy", "student_correct"]).to_pylist()
    report = log.reports["entropy_route"]
    checked = [r for r in routed if r["student_correct"] is not None]
    return {
        "entropy_model": model,
        "answer_prompt_shots": shots,
        "entropy_roc_auc_95ci": bootstrap_auc([r["entropy"] for r in checked], [not r["student_correct"] for r in checked]),
        "student_correct_count": sum(1 for r in checked if r["student_correct"]),
        "entropy_rows": scored.num_rows,
        "entropy_scoring_rows_per_second": round(scored.num_rows / scoring_seconds, 2),
        "entropy_scoring_seconds_incl_actor_start": round(scoring_seconds, 2),
        "entropy_route_scoring_rows_per_second_16_tokens": report["scoring_rows_per_second"],
        "entropy_roc_auc": None if report["entropy_roc_auc"] is None else round(report["entropy_roc_auc"], 4),
        "entropy_auc_prompts": report["auc_prompts"],
        "student_accuracy": report["student_accuracy"],
        "student_accuracy_by_difficulty": report["student_accuracy_by_difficulty"],
        "entropy_split": report["split"],
        "entropy_thresholds": [round(t, 5) for t in report["thresholds"]],
        "cot_prompts_saved_fraction": report["cot_prompts_saved_fraction"],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entropy-rows", type=int, default=200)
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--shots", type=int, default=2, help="solved examples in the answer-only prompt")
    parser.add_argument("--scoring-rows", type=int, default=64, help="rows of the scoring-only speed pass")
    parser.add_argument("--skip-entropy", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from raypost.runtime import ensure_ray

    ensure_ray()
    problems = load_gsm8k()
    time_dedup(dedup_rows(problems, 500))  # warm: Ray workers and imports
    at_10k = time_dedup(dedup_rows(problems, 10_000))
    at_20k = time_dedup(dedup_rows(problems, 20_000))
    brute_2k, lsh_2k = brute_force_seconds(dedup_rows(problems, 2_000))
    result = {
        "dedup_rows_per_second_10k": at_10k["rows_per_second"],
        "dedup_rows_per_second_20k": at_20k["rows_per_second"],
        "dedup_seconds_10k": at_10k["seconds"],
        "dedup_seconds_20k": at_20k["seconds"],
        "near_dup_pass_seconds_10k": at_10k["near_dup_pass_seconds"],
        "near_dup_pass_seconds_20k": at_20k["near_dup_pass_seconds"],
        "near_dup_time_ratio_20k_vs_10k": round(at_20k["near_dup_pass_seconds"] / max(at_10k["near_dup_pass_seconds"], 1e-9), 3),
        "dedup_total_time_ratio_20k_vs_10k": round(at_20k["seconds"] / max(at_10k["seconds"], 1e-9), 3),
        "removed_10k": at_10k["removed"],
        "removed_20k": at_20k["removed"],
        "baseline_brute_force_pairs_seconds_2k": round(brute_2k, 3),
        "lsh_pass_seconds_2k": round(lsh_2k, 3),
        "lsh_speedup_vs_brute_force_2k": round(brute_2k / max(lsh_2k, 1e-9), 2),
        "cpus": os.cpu_count(),
    }
    result["near_dup_subquadratic"] = result["near_dup_time_ratio_20k_vs_10k"] <= 2.5
    if not args.skip_entropy:
        result.update(entropy_bench(args.model, args.entropy_rows, args.shots, args.scoring_rows))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
