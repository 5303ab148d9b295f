"""`evaluate()`: score one model on one benchmark.

    summary = evaluate("gsm8k", model="packaged:smollm2-135m-instruct",
                       engine=EngineConfig(backend="transformers"), output_dir="runs/eval/base/gsm8k",
                       limit=50, shots=4)

Items are loaded from the standard file, prompted, generated on Ray Data engine actors
(`raypost.generation.pipeline.generate`: vLLM, transformers or any OpenAI-compatible
endpoint), then scored. The run directory holds:

    generations/    the raw generation rows (resumable: a rerun skips what is there)
    items/          one row per (item, sample): prompt, response, extracted, correct, error_kind
    rejected/       benchmark rows the loader set aside (file:line and reason)
    summary.json    metrics (pass@k, per subject, error kinds) and the settings of the run
    summary.md      the same as a Markdown table
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from raypost import metrics, records
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.evaluation.benchmarks import BenchmarkOptions, default_data_path, get_benchmark
from raypost.evaluation.items import GENERATED_COLUMNS, ITEM_SCHEMA, item_row, score_block, task_table
from raypost.evaluation.loaders import EvalItem
from raypost.evaluation.scoring import Score, pass_at_k
from raypost.generation.batches import LIGHT_CPUS
from raypost.records import DataError
from raypost.runtime import shared


@dataclass
class EvalSummary:
    benchmark: str
    model: str
    output_dir: str
    metrics: dict[str, float] = field(default_factory=dict)      # pass@1, pass@k, ...
    by_subject: dict[str, float] = field(default_factory=dict)   # pass@1 per subject (MMLU, testbed levels)
    # 95% percentile-bootstrap interval of pass@1, over items: the whole set and per subject
    pass_at_1_ci95: list[float] | None = None
    by_subject_ci95: dict[str, list[float]] = field(default_factory=dict)
    items: int = 0
    samples: int = 0
    correct_samples: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    rejected_items: int = 0           # rows of the benchmark file the loader set aside
    generation_errors: int = 0        # samples the engine could not produce (counted as wrong)
    seconds: float = 0.0
    generation_seconds: float = 0.0
    items_per_second: float = 0.0     # evaluated items / generation wall time (incl. start-up)
    engine: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        metrics = ", ".join(f"{k} {100 * v:.2f}" for k, v in self.metrics.items())
        return f"eval {self.benchmark} [{self.model}]: {metrics} on {self.items} items -> {self.output_dir}"

    def markdown(self) -> str:
        lines = [f"## {self.benchmark}: {self.model}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {100 * v:.2f} |" for k, v in self.metrics.items()]
        if self.pass_at_1_ci95:
            lines.append(f"| pass@1 95% CI | [{100 * self.pass_at_1_ci95[0]:.2f}, {100 * self.pass_at_1_ci95[1]:.2f}] |")
        lines += [f"| {s} pass@1 | {100 * v:.2f}" + (f" [{100 * self.by_subject_ci95[s][0]:.2f}, "
                                                     f"{100 * self.by_subject_ci95[s][1]:.2f}]"
                                                     if s in self.by_subject_ci95 else "") + " |"
                  for s, v in self.by_subject.items()]
        lines += [f"| items | {self.items} |", f"| samples | {self.samples} |",
                  f"| rejected rows | {self.rejected_items} |", f"| generation errors | {self.generation_errors} |"]
        if self.error_kinds:
            lines += ["", "| error kind | samples |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in sorted(self.error_kinds.items(), key=lambda kv: -kv[1])]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def select_subset(items: list[EvalItem], limit: int | None, seed: int) -> list[EvalItem]:
    """`limit` items drawn with `seed`, kept in file order: the same subset for every model."""
    if limit is None or limit >= len(items):
        return list(items)
    chosen = set(random.Random(seed).sample(range(len(items)), limit))
    return [item for index, item in enumerate(items) if index in chosen]


def resolve_prompt_style(style: str, model: str, engine: EngineConfig, cache_dir: str | None) -> str:
    """`auto`: chat when the model has a chat template (or is behind an OpenAI endpoint)."""
    if style != "auto":
        return style
    from raypost.engines import pick_backend

    if pick_backend(engine) in ("openai", "reference", "procedural"):
        return "chat"
    from transformers import AutoTokenizer

    from raypost.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model, cache_dir))
    return "chat" if getattr(tokenizer, "chat_template", None) else "completion"


def evaluate(
    benchmark: str,
    *,
    model: str,
    engine: EngineConfig | None = None,
    output_dir: str | Path,
    data_path: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    n: int = 1,
    k: Sequence[int] = (1,),
    shots: int | None = None,
    sampling: SamplingConfig | None = None,
    resources: Resources | None = None,
    cache_dir: str | None = None,
    prompt_style: str = "auto",
    method: str = "generate",
    shots_path: str | Path | None = None,
    split: str = "test",
    subjects: Sequence[str] | None = None,
    timeout_s: float = 10.0,
    model_label: str | None = None,
    progress: bool = True,
    engine_actor=None,
) -> EvalSummary:
    """Score `model` on `benchmark` (gsm8k, mbpp, humaneval, mmlu_math); see the module doc."""
    started = time.perf_counter()
    bench = get_benchmark(benchmark)
    engine = engine or EngineConfig()
    resources = resources or Resources()
    output_dir = Path(output_dir)
    if method not in ("generate", "loglik"):
        raise DataError(f"method must be generate or loglik, got {method!r}")
    if method == "loglik" and benchmark != "mmlu_math":
        raise DataError(f"{benchmark}: log-likelihood scoring is for multiple choice (mmlu_math) only")
    data_path = Path(data_path) if data_path else default_data_path(bench)
    options = BenchmarkOptions(shots=shots, shots_path=str(shots_path) if shots_path else None, split=split,
                               subjects=list(subjects) if subjects else None, method=method, timeout_s=timeout_s)
    options.prompt_style = "completion" if method == "loglik" else resolve_prompt_style(
        prompt_style, model, engine, cache_dir)

    loaded = bench.load(data_path, options)
    if loaded.rejected:
        shutil.rmtree(output_dir / "rejected", ignore_errors=True)
        records.write_rejected(output_dir / "rejected", loaded.rejected)
    items = select_subset(loaded.items, limit, seed)
    if not items:
        raise DataError(f"{data_path}: no {benchmark} items to evaluate ({len(loaded.rejected)} rows rejected)")
    prompts, stop = bench.prompts(items, data_path, options)

    sampling = (sampling or SamplingConfig(temperature=0.0, max_tokens=bench.max_tokens)).model_copy(
        update={"n": n, "stop": list(dict.fromkeys([*(sampling.stop if sampling else []), *stop]))})
    ks = sorted(set(k))
    settings = dict(benchmark=benchmark, model=model, data_path=str(data_path), limit=limit, seed=seed, n=n, k=ks,
                    shots=options.shots, shots_path=options.shots_path, prompt_style=options.prompt_style,
                    method=method, split=split, subjects=options.subjects, backend=engine.backend,
                    sampling=sampling.model_dump())
    _check_settings(output_dir, settings)

    summary = EvalSummary(benchmark, model_label or model, str(output_dir), settings=settings,
                          rejected_items=len(loaded.rejected))
    generation_started = time.perf_counter()
    if method == "loglik":
        generated, failed = _loglik_rows(items, prompts, model, engine, resources, cache_dir)
        summary.engine = "transformers (log-likelihood)"
    else:
        generated, failed, summary.engine = _generate_rows(items, prompts, model, engine, sampling, resources,
                                                           cache_dir, output_dir, data_path,
                                                           progress and f"eval {benchmark} [{model_label or model}]",
                                                           engine_actor)
    summary.generation_seconds = time.perf_counter() - generation_started
    summary.items_per_second = len(items) / max(summary.generation_seconds, 1e-9)

    verdicts = _score(generated, bench, options, items, prompts, failed, n, model_label or model, output_dir)
    _fill_metrics(summary, items, verdicts, n, ks)
    if n > 1 and sampling.temperature == 0:
        summary.notes.append("n > 1 with temperature 0: samples are (near) identical; pass@k > 1 means little")
    summary.seconds = time.perf_counter() - started
    (output_dir / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2, default=str))
    (output_dir / "summary.md").write_text(summary.markdown())
    return summary


def _check_settings(output_dir: Path, settings: dict[str, Any]) -> None:
    """Generations are reused on rerun, so a run directory belongs to one set of settings."""
    path = output_dir / "settings.json"
    text = json.dumps(settings, sort_keys=True, default=str)
    if path.exists() and path.read_text() != text and records.count_rows(output_dir / "generations"):
        old = json.loads(path.read_text())
        changed = sorted(key for key in set(old) | set(settings) if old.get(key) != json.loads(text).get(key))
        raise DataError(f"{output_dir}: holds generations made with other settings ({', '.join(changed)}); "
                        "use another output_dir or delete it")
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _generate_rows(items, prompts, model, engine, sampling, resources, cache_dir, output_dir, data_path, progress,
                   engine_actor=None):
    """The generation stage over the items' prompts; the rows stay in its parts, read by Ray Data
    where they are scored."""
    import ray

    from raypost.generation.pipeline import generate

    prompt_rows = [{"id": i.id, "messages": m, "reference": i.reference} for i, m in zip(items, prompts)]
    generations = output_dir / "generations"
    result = generate(prompt_rows, model=model, output_dir=generations, engine=engine, sampling=sampling,
                      resources=resources, cache_dir=cache_dir, source=str(data_path), progress=progress,
                      engine_actor=engine_actor)
    parts = [str(p) for p in records.part_files(generations)]
    generated = ray.data.read_parquet(parts).select_columns(GENERATED_COLUMNS) if parts else None
    failed = {}
    for r in records.read_rows(generations / "rejected"):
        failed.setdefault(r["id"], r["reason"])
    return generated, failed, result.engine


def _loglik_rows(items, prompts, model, engine, resources, cache_dir):
    import pyarrow as pa
    import ray

    from raypost.evaluation.loglik import score_loglik
    from raypost.models import resolve_model

    texts = [{"id": i.id, "text": m[-1]["content"]} for i, m in zip(items, prompts)]
    scored = score_loglik(texts, str(resolve_model(model, cache_dir)), dtype=engine.dtype,
                          batch_size=engine.batch_size, concurrency=resources.concurrency,
                          cpus_per_actor=resources.cpus_per_actor, gpus_per_actor=resources.gpus_per_actor)
    rows = [{"id": s["id"], "sample_index": 0, "response": s["response"], "finish_reason": "loglik",
             "completion_tokens": 0} for s in scored if not s["error"]]
    failed = {s["id"]: s["error"] for s in scored if s["error"]}
    return (ray.data.from_arrow(pa.Table.from_pylist(rows)) if rows else None), failed


def _score(generated, bench, options, items, prompts, failed, n, model, output_dir: Path) -> list[dict[str, Any]]:
    """Score on the workers (raypost.evaluation.items), which commit the item rows; the driver
    adds a row for each sample the engine could not produce (counted as wrong, with the reason)
    and returns (id, sample_index, correct, error_kind) per sample."""
    import ray

    items_dir = output_dir / "items"
    shutil.rmtree(items_dir, ignore_errors=True)
    tasks = task_table(items, prompts)
    verdicts: list[dict[str, Any]] = []
    if generated is not None:
        scored = generated.map_batches(
            score_block, batch_format="pyarrow", batch_size=None, num_cpus=1 if bench.runs_code else LIGHT_CPUS,
            fn_kwargs=dict(tasks=shared(tasks), benchmark=bench.name, options=asdict(options), n=n, model=model,
                           items_dir=str(items_dir)))
        metrics.named(scored, "eval", str(items_dir))
        verdicts = [row for block in ray.get(scored.to_arrow_refs()) for row in block.to_pylist()]
    done = {(v["id"], v["sample_index"]) for v in verdicts}
    missing = [item_row(task, sample, None, Score(None, False, "generation_error"), benchmark=bench.name, model=model,
                        failure=failed.get(task["id"]))
               for task in tasks.to_pylist() for sample in range(n) if (task["id"], sample) not in done]
    if missing:
        records.write_part(items_dir, missing, ITEM_SCHEMA)
    return verdicts + [{k: r[k] for k in ("id", "sample_index", "correct", "error_kind")} for r in missing]


def item_pass_at_k(item_rows: list[dict[str, Any]], k: int) -> dict[str, float]:
    """Per item: pass@k over its samples (items with fewer than k samples are left out)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in item_rows:
        counts[r["id"]][0] += 1
        counts[r["id"]][1] += int(bool(r["correct"]))
    return {item: pass_at_k(n, c, k) for item, (n, c) in counts.items() if n >= k}


def _fill_metrics(summary: EvalSummary, items, item_rows, n: int, ks: list[int]) -> None:
    summary.items = len(items)
    summary.samples = len(item_rows)
    summary.correct_samples = sum(bool(r["correct"]) for r in item_rows)
    summary.error_kinds = dict(Counter(r["error_kind"] for r in item_rows if r["error_kind"]))
    summary.generation_errors = summary.error_kinds.get("generation_error", 0)
    for k in ks:
        if k > n:
            summary.notes.append(f"pass@{k} needs n >= {k} samples per item (n = {n}); not computed")
            continue
        values = item_pass_at_k(item_rows, k)
        summary.metrics[f"pass@{k}"] = sum(values.values()) / len(values)
    per_item = item_pass_at_k(item_rows, 1)
    if "pass@1" not in summary.metrics:
        summary.metrics["pass@1"] = sum(per_item.values()) / len(per_item)
    summary.pass_at_1_ci95 = bootstrap_ci95(list(per_item.values()))
    subjects = sorted({i.subject for i in items if i.subject})
    if len(subjects) > 1:
        for subject in subjects:
            values = [per_item[i.id] for i in items if i.subject == subject]
            summary.by_subject[subject] = sum(values) / len(values)
            summary.by_subject_ci95[subject] = bootstrap_ci95(values)


def bootstrap_ci95(values: list[float], samples: int = 2000, seed: int = 0) -> list[float] | None:
    """95% percentile interval of the mean over items resampled with replacement."""
    from raypost.evaluation.compare import bootstrap_interval

    if not values:
        return None
    low, high = bootstrap_interval(values, samples, seed)
    return [round(low, 4), round(high, 4)]
