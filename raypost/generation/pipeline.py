"""Teacher generation on Ray Data: prompt rows -> engine actors -> Parquet parts.

    generate(prompts, model=..., engine=..., sampling=..., output_dir=...)

The driver checks prompts (shape, context length), skips what an earlier run already wrote,
streams the rest through engine actors, and writes each finished batch as one atomic Parquet
part: a crash or Ctrl-C loses at most the batches in flight, and every (id, sample) lands
exactly once. Bad rows go to `<output_dir>/rejected/` with their reason.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from raypost import records, schema
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.engines import pick_backend


MIN_STEADY_SECONDS = 1.0


@dataclass
class GenerationSummary:
    output_dir: str
    rejected_dir: str
    rows_written: int = 0          # this run
    rows_skipped: int = 0          # already present from an earlier run
    rows_total: int = 0            # in the output after this run
    rows_rejected: int = 0         # this run
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0   # until the first batch came back: engine load, warm-up
    tokens_per_second: float = 0.0  # completion tokens / whole wall time, start-up included
    # completion tokens after the first batch / time after it: the engine's steady rate. None
    # when the batches came back too close together to time (e.g. all in flight at once).
    steady_tokens_per_second: float | None = None
    engine: str = ""
    model: str = ""
    reject_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"generate: {self.rows_written} rows done ({self.rows_skipped} already there, "
            f"{self.rows_total} in output), {self.rows_rejected} rejected, "
            f"{self.tokens_per_second:.1f} tok/s overall"
            + (f", {self.steady_tokens_per_second:.1f} tok/s steady" if self.steady_tokens_per_second else "")
            + f", first batch after {self.startup_seconds:.1f}s "
            f"[{self.engine}] -> {self.output_dir}"
        )


def done_keys(output_dir: Path) -> set[tuple[str, int]]:
    table = records.read_table(output_dir, columns=[schema.ID, schema.SAMPLE_INDEX])
    if table is None:
        return set()
    return set(zip(table.column(schema.ID).to_pylist(), table.column(schema.SAMPLE_INDEX).to_pylist()))


def check_context_length(rows: list[dict[str, Any]], tokenizer: Any, max_model_len: int, max_tokens: int,
                         source: str) -> tuple[list[dict[str, Any]], list[records.Rejected]]:
    """Set aside prompts that leave no room for an answer in the model's context."""
    from raypost.engines.chat import count_prompt_tokens

    kept, rejected = [], []
    for row in rows:
        n = count_prompt_tokens(tokenizer, row[schema.MESSAGES])
        if n >= max_model_len:
            rejected.append(records.Rejected(row[schema.ID], row, source,
                                             f"prompt has {n} tokens; the model's context is {max_model_len}"))
        else:
            kept.append(row)
    return kept, rejected


def model_context_length(model_path: Path, engine: EngineConfig) -> int:
    if engine.max_model_len:
        return engine.max_model_len
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return int(getattr(config, "max_position_embeddings", 2048))


def generate(
    prompts: Sequence[dict[str, Any]],
    *,
    model: str,
    output_dir: str | Path,
    engine: EngineConfig | None = None,
    sampling: SamplingConfig | None = None,
    resources: Resources | None = None,
    cache_dir: str | None = None,
    rejected: Sequence[records.Rejected] = (),
    source: str = "prompts",
    progress: bool = True,
) -> GenerationSummary:
    """Generate `sampling.n` responses per prompt row (prompt schema) into `output_dir`.

    `rejected` carries rows an earlier step (the file loader) already set aside, so they are
    counted and stored with the rest. Returns counts and throughput; the rows are in
    `output_dir` as Parquet (`ray.data.read_parquet(output_dir)`).
    """
    from raypost.runtime import ensure_ray

    engine = engine or EngineConfig()
    sampling = sampling or SamplingConfig()
    resources = resources or Resources()
    output_dir = Path(output_dir)
    rejected_dir = output_dir / "rejected"
    backend = pick_backend(engine)
    summary = GenerationSummary(str(output_dir), str(rejected_dir), engine=backend, model=model)
    started = time.perf_counter()
    set_aside = list(rejected)

    model_path = None
    if backend in ("vllm", "transformers"):
        from transformers import AutoTokenizer

        from raypost.models import resolve_model

        model_path = resolve_model(model, cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        prompts, too_long = check_context_length(
            list(prompts), tokenizer, model_context_length(model_path, engine), sampling.max_tokens, source)
        set_aside.extend(too_long)
    elif backend == "reference":
        missing = [r for r in prompts if r.get(schema.REFERENCE) is None]
        set_aside.extend(records.Rejected(r[schema.ID], r, source, "no reference answer") for r in missing)
        prompts = [r for r in prompts if r.get(schema.REFERENCE) is not None]

    already = done_keys(output_dir)
    todo = [
        {**row, schema.SAMPLE_INDEX: k}
        for row in prompts
        for k in range(sampling.n)
        if (row[schema.ID], k) not in already
    ]
    summary.rows_skipped = len(prompts) * sampling.n - len(todo)
    _record_rejected(rejected_dir, set_aside, summary)

    if todo:
        ensure_ray()
        import ray

        if backend == "vllm":
            from raypost.engines.chat import render_prompt

            for row in todo:
                row["prompt"] = render_prompt(tokenizer, row[schema.MESSAGES])
        dataset = ray.data.from_items(todo)
        if backend == "vllm":
            from raypost.engines.shm_cleanup import removing_orphaned_segments
            from raypost.generation.vllm_stage import vllm_generation_stage

            # Ray kills the engine actors; their vLLM message-queue segments would stay in /dev/shm.
            with removing_orphaned_segments(wait_seconds=15.0):
                generated = vllm_generation_stage(dataset, model_path, model, engine, sampling, resources)
                _drain(generated, output_dir, rejected_dir, len(todo), summary, source, progress, started)
        else:
            generated = _engine_actor_stage(dataset, model if model_path is None else str(model_path), model,
                                            engine, sampling, resources, cache_dir)
            _drain(generated, output_dir, rejected_dir, len(todo), summary, source, progress, started)

    summary.seconds = time.perf_counter() - started
    summary.rows_total = records.count_rows(output_dir)
    return summary


def _engine_actor_stage(dataset, model_ref: str, model_label: str, engine: EngineConfig, sampling: SamplingConfig,
                        resources: Resources, cache_dir: str | None):
    from raypost.generation.actors import EngineActor

    return dataset.map_batches(
        EngineActor,
        fn_constructor_kwargs=dict(
            model=model_ref,
            engine_config=engine.model_dump(),
            sampling=sampling.model_dump(),
            cache_dir=cache_dir,
            model_label=model_label,
        ),
        batch_size=engine.batch_size,
        compute=__import__("ray").data.ActorPoolStrategy(size=resources.concurrency),
        num_cpus=resources.cpus_per_actor,
        num_gpus=resources.gpus_per_actor,
    )


def _drain(generated, output_dir: Path, rejected_dir: Path, total: int, summary: GenerationSummary, source: str,
           progress: bool, started: float) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, desc="generate", unit="row", disable=not progress, file=sys.stderr)
    first_batch_at = None
    tokens_after_first = 0
    try:
        for batch in generated.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = batch.to_pylist()
            good = [r for r in rows if not r.get("error")]
            bad = [r for r in rows if r.get("error")]
            for r in good:
                r.pop("error", None)
            records.write_part(output_dir, good, schema.GENERATION_SCHEMA)
            _record_rejected(
                rejected_dir,
                [records.Rejected(r[schema.ID], {k: r[k] for k in (schema.ID, schema.MESSAGES, schema.SAMPLE_INDEX)},
                                  source, r["error"]) for r in bad],
                summary,
            )
            completion_tokens = sum(r[schema.COMPLETION_TOKENS] or 0 for r in good)
            summary.rows_written += len(good)
            summary.prompt_tokens += sum(r[schema.PROMPT_TOKENS] or 0 for r in good)
            summary.completion_tokens += completion_tokens
            now = time.perf_counter()
            if first_batch_at is None:
                first_batch_at = now
                summary.startup_seconds = now - started
            else:
                tokens_after_first += completion_tokens
                if now - first_batch_at >= MIN_STEADY_SECONDS:
                    summary.steady_tokens_per_second = tokens_after_first / (now - first_batch_at)
            summary.tokens_per_second = summary.completion_tokens / max(now - started, 1e-9)
            bar.update(len(rows))
            bar.set_postfix(tok_s=f"{summary.tokens_per_second:.0f}")
    finally:
        bar.close()


def _record_rejected(rejected_dir: Path, rows: list[records.Rejected], summary: GenerationSummary) -> None:
    if not rows:
        return
    summary.rows_rejected += records.write_rejected(rejected_dir, rows)
    for r in rows:
        key = r.reason.split(":")[0][:80]
        summary.reject_reasons[key] = summary.reject_reasons.get(key, 0) + 1
