"""The vLLM generation stage, built on Ray's own `ray.data.llm` processor.

Ray's processor already chains chat template -> tokenize -> vLLM engine actors -> detokenize;
raypost only maps its rows to and from the record schema. On CPUs it gets a CPU-only
placement bundle; on GPUs, GPUs per actor and tensor parallelism come from the recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raypost import schema
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.engines.vllm_engine import convert_vllm_logprobs, vllm_engine_kwargs, vllm_env, vllm_sampling_kwargs
from raypost.generation.batches import LIGHT_CPUS

def processor_config(model_path: Path, engine: EngineConfig, resources: Resources):
    from ray.data.llm import vLLMEngineProcessorConfig

    kwargs = vllm_engine_kwargs(engine, resources.tensor_parallel_size, on_gpu=resources.gpus_per_actor > 0)
    if resources.gpus_per_actor > 0:
        placement = {"bundle_per_worker": {"GPU": 1, "CPU": resources.cpus_per_actor}}
    else:
        # Without GPUs, Ray's default bundle asks for a GPU and never schedules: CPU only.
        placement = {"bundles": [{"CPU": resources.cpus_per_actor}] * resources.tensor_parallel_size}
    # vLLM reads its knobs (e.g. VLLM_CPU_KVCACHE_SPACE) from the environment of the engine
    # actor, which is the raylet's, not the driver's: pass the driver's VLLM_* settings along.
    env = vllm_env(on_gpu=resources.gpus_per_actor > 0)
    return vLLMEngineProcessorConfig(
        model_source=str(model_path),
        runtime_env={"env_vars": env} if env else None,
        engine_kwargs=kwargs,
        concurrency=resources.concurrency,
        batch_size=engine.batch_size,
        placement_group_config=placement,
        should_continue_on_error=True,
        log_engine_metrics=False,
        # Each prompt is already rendered with the model's chat template (the same
        # render_prompt every engine uses), and vLLM tokenizes and detokenizes itself: Ray's
        # separate template/tokenize/detokenize actors would only add processes (and, at one
        # CPU each by default, deadlock a 2-CPU node next to the engine's bundle).
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )


def _to_record(row: dict[str, Any], sampling: SamplingConfig, model_label: str) -> dict[str, Any]:
    error = row.get("__inference_error__") or None
    logprob_steps = row.get("logprobs")
    records_, entropy = None, None
    if logprob_steps is not None and len(logprob_steps) and not error:
        converted, entropy = convert_vllm_logprobs(logprob_steps, row.get("generated_tokens"), sampling.logprobs)
        records_ = [{"token": t.token, "logprob": t.logprob, "top": [{"token": tok, "logprob": lp} for tok, lp in t.top]}
                    for t in converted]
    completion_tokens = int(row.get("num_generated_tokens") or 0)
    return {
        schema.ID: row[schema.ID],
        schema.MESSAGES: row[schema.MESSAGES],
        schema.REFERENCE: row.get(schema.REFERENCE),
        schema.SAMPLE_INDEX: int(row[schema.SAMPLE_INDEX]),
        schema.RESPONSE: None if error else row.get("generated_text", ""),
        schema.PROMPT_TOKENS: int(row.get("num_input_tokens") or 0),
        schema.COMPLETION_TOKENS: completion_tokens,
        # ray.data.llm does not pass vLLM's finish reason through; a full budget means "length".
        schema.FINISH_REASON: None if error else ("length" if completion_tokens >= sampling.max_tokens else "stop"),
        schema.LOGPROBS: records_ if sampling.logprobs is not None else None,
        schema.FIRST_TOKEN_ENTROPY: entropy if sampling.first_token_entropy else None,
        schema.ENGINE: "vllm",
        schema.MODEL: model_label,
        "error": str(error) if error else None,
    }


def vllm_generation_stage(dataset, model_path: Path, model_label: str, engine: EngineConfig,
                          sampling: SamplingConfig, resources: Resources):
    """Rows with id/messages/prompt/reference/sample_index in, generation-schema rows (+ error) out."""
    from ray.data.llm import build_processor

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {
            **row,
            # one row per sample: n=1, each sample its own seed
            "sampling_params": vllm_sampling_kwargs(
                sampling, n=1, seed=None if sampling.seed is None else sampling.seed + int(row[schema.SAMPLE_INDEX])),
        }

    # rows carry `prompt`, rendered on the workers with the model's chat template (batches.check_context)

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        return _to_record(row, sampling, model_label)

    light = {"num_cpus": LIGHT_CPUS}
    processor = build_processor(processor_config(model_path, engine, resources),
                                preprocess=preprocess, postprocess=postprocess,
                                preprocess_map_kwargs=light, postprocess_map_kwargs=light)
    return processor(dataset)
