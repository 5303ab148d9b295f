"""The `eval` recipe stage: every model on every benchmark, one run directory each.

    <stage dir>/<model label>/<benchmark>/   (see raypost.evaluation.harness)
    <stage dir>/results.md                   models side by side
    <stage dir>/compare-<a>-vs-<b>.md        first model against each other one

Models of one architecture and tokenizer (a base model and what was trained from it) can share
one engine: it starts for the first model that has anything to generate, and each next model's
weights are loaded into it in place (`one_engine`; with vLLM a start-up costs more than a
100-item benchmark). The stage's summary lists each weight load (`weight_loads`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from raypost import console
from raypost.evaluation.compare import compare
from raypost.config import RecipeError
from raypost.evaluation.config import EvalStage
from raypost.evaluation.harness import EvalSummary, evaluate

# what must agree for one model's weights to load into an engine built for another
_SHAPE_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def model_reference(entry: str, context) -> tuple[str, str]:
    """(reference, label) for one entry of `models`: `stage:<name>` is the model a train or
    merge stage exported to `<its stage dir>/model`."""
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", entry).strip("-") or "model"
    return context.model_reference(entry), label


def results_table(summaries: dict[str, dict[str, EvalSummary]]) -> str:
    """Markdown: one row per (benchmark, metric), one column per model."""
    labels = list(summaries)
    lines = ["| benchmark | metric | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    benchmarks = list(dict.fromkeys(b for per_model in summaries.values() for b in per_model))
    for benchmark in benchmarks:
        metrics = list(dict.fromkeys(m for s in summaries.values() if benchmark in s for m in s[benchmark].metrics))
        for metric in metrics:
            cells = []
            for label in labels:
                summary = summaries[label].get(benchmark)
                value = None if summary is None else summary.metrics.get(metric)
                cells.append("—" if value is None else f"{100 * value:.2f}")
            lines.append(f"| {benchmark} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def engine_signature(path: Path) -> tuple:
    """What an engine built for the model at `path` fixes: its shapes and its tokenizer."""
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config") or {}
    digest = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (path / name).is_file():
            data = (path / name).read_bytes()
            if name == "tokenizer_config.json":   # the chat template and special tokens, not paths or versions
                loaded = json.loads(data)
                data = json.dumps({k: loaded.get(k) for k in ("chat_template", "bos_token", "eos_token", "pad_token",
                                                              "added_tokens_decoder")}, sort_keys=True).encode()
            digest.update(name.encode() + b"\0" + data)
    return tuple(config.get(k, text.get(k)) for k in _SHAPE_KEYS), digest.hexdigest()


class OneEngine:
    """One engine actor for the stage's models: started for the first model that has anything to
    generate, each next model's weights loaded into it in place (raypost.loop.engines)."""

    def __init__(self, stage: EvalStage, resources, cache_dir: str | None):
        self.config, self.resources, self.cache_dir = stage.engine, resources, cache_dir
        self.actor = None
        self.model: str | None = None
        self.loads: list[dict[str, Any]] = []

    def __call__(self, model_path: str):
        import ray

        from raypost.loop.engines import start_engine_actor

        if self.actor is None:
            self.actor = start_engine_actor(model_path, self.config, self.resources, self.cache_dir)
        elif model_path != self.model:
            self.loads.append({"model": model_path, **ray.get(self.actor.load_weights.remote(model_path))})
        self.model = model_path
        return self.actor

    def close(self) -> None:
        from raypost.loop.engines import stop_engine_actor

        if self.actor is not None:
            stop_engine_actor(self.actor)
            self.actor = None


def one_engine_for(stage: EvalStage, references: list[str], resources, cache_dir: str | None) -> OneEngine | None:
    """A shared engine where the stage asks for one (see `one_engine`), else None."""
    from raypost.engines import pick_backend
    from raypost.models import resolve_model

    backend = pick_backend(stage.engine)
    wanted = stage.one_engine
    if wanted is False or len(set(references)) < 2 or backend not in ("vllm", "transformers"):
        return None
    if wanted == "auto" and (backend != "vllm" or resources.concurrency != 1 or resources.tensor_parallel_size != 1):
        return None
    if resources.tensor_parallel_size != 1:
        raise RecipeError(f"stages.{stage.name}.one_engine: the shared engine is one actor without tensor "
                          f"parallelism (tensor_parallel_size is {resources.tensor_parallel_size}); set one_engine: auto")
    signatures = {ref: engine_signature(Path(resolve_model(ref, cache_dir))) for ref in references}
    first = references[0]
    differs = [ref for ref in references if signatures[ref] != signatures[first]]
    if not differs:
        return OneEngine(stage, resources, cache_dir)
    if wanted is True:
        raise RecipeError(f"stages.{stage.name}.one_engine: {differs[0]} has another architecture or tokenizer than "
                          f"{first}; one engine cannot hold both (set one_engine: auto or false)")
    return None


def run_eval_stage(stage: EvalStage, context) -> dict[str, Any]:
    from raypost.engines.shm_cleanup import removing_orphaned_segments
    from raypost.evaluation.benchmarks import default_data_path, get_benchmark

    stage_dir: Path = context.stage_dir(stage.name)
    for spec in stage.benchmark_specs():  # a missing default file stops the stage before any model loads
        if not spec.data_path:
            default_data_path(get_benchmark(spec.name))
    models = [model_reference(entry, context) for entry in stage.models]
    shared = one_engine_for(stage, [reference for reference, _ in models], context.resources_for(stage),
                            context.recipe.cache_dir)
    if shared is None:
        summaries = _evaluate_models(stage, context, models, stage_dir, None)
    else:
        # Ray kills a vLLM engine's worker; its message-queue segments would stay in /dev/shm
        with removing_orphaned_segments(wait_seconds=15.0):
            try:
                summaries = _evaluate_models(stage, context, models, stage_dir, shared)
            finally:
                shared.close()
    table = results_table(summaries)
    (stage_dir / "results.md").write_text(table)
    console.say(table)
    labels = list(summaries)
    for other in labels[1:]:
        text = compare(stage_dir / labels[0], stage_dir / other)
        (stage_dir / f"compare-{labels[0]}-vs-{other}.md").write_text(text)
        console.say(text)
    result = {
        "results": str(stage_dir / "results.md"),
        "runs": {label: {b: s.as_dict() for b, s in per.items()} for label, per in summaries.items()},
    }
    if shared is not None:
        result["weight_loads"] = shared.loads
    return result


def _evaluate_models(stage: EvalStage, context, models: list[tuple[str, str]], stage_dir: Path,
                     shared: OneEngine | None) -> dict[str, dict[str, EvalSummary]]:
    summaries: dict[str, dict[str, EvalSummary]] = {}
    for reference, label in models:
        summaries[label] = {}
        for spec in stage.benchmark_specs():
            summary = evaluate(
                spec.name,
                model=reference,
                engine=stage.engine,
                output_dir=stage_dir / label / spec.name,
                data_path=spec.data_path,
                limit=spec.limit,
                seed=spec.seed,
                n=spec.n,
                k=spec.k,
                shots=spec.shots,
                sampling=spec.sampling or stage.sampling,
                resources=context.resources_for(stage),
                cache_dir=context.recipe.cache_dir,
                prompt_style=spec.prompt_style,
                method=spec.method,
                shots_path=spec.shots_path,
                split=spec.split,
                subjects=spec.subjects,
                timeout_s=spec.timeout_s,
                model_label=label,
                engine_actor=shared,
            )
            console.say(summary.line())
            summaries[label][spec.name] = summary
    return summaries
