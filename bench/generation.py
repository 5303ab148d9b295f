"""Generation throughput: raypost on Ray Data vs the bare engine vs ray.data.llm used directly.

All measured in one run on the same model, prompts and cores. tok/s are completion tokens per
second once the engine is up. The bare engine is timed after its construction and a warm-up
call. A Ray Data pipeline cannot be timed that way (its batches come back in bursts, so "after
the first batch" overstates it): each pipeline runs twice, on `--small-prompts` and on
`--prompts` prompts, and the steady rate is the difference in tokens over the difference in
wall time. Start-up (Ray actors, engine load, compile: the fixed cost the difference cancels)
is reported apart, not hidden.

    python bench/generation.py [--prompts 256] [--max-tokens 64] [--model packaged:smollm2-135m-instruct]

Last line: one JSON object with raypost_tok_s, bare_engine_tok_s, ratio, ray_data_llm_tok_s,
vllm_vs_transformers and the start-up seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_questions(count: int) -> list[dict]:
    shared = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    source = shared if shared.exists() else REPO / "data" / "gsm8k" / "quickstart.jsonl"
    lines = source.read_text().splitlines()
    rows = []
    for i in range(count):
        question = json.loads(lines[i % len(lines)])["question"]
        rows.append({"id": f"b{i}", "messages": [{"role": "user", "content": question}], "reference": None})
    return rows


def bare_engine(backend: str, model: str, rows, sampling, engine_config) -> dict:
    from raypost.engines import Request, build_engine

    started = time.perf_counter()
    engine = build_engine(model, engine_config.model_copy(update={"backend": backend}))
    # warm-up on one prompt so compile/first-call cost lands in start-up, as for the pipeline
    engine.generate([Request("w", rows[0]["messages"])], sampling.model_copy(update={"max_tokens": 2}))
    startup = time.perf_counter() - started
    requests = [Request(r["id"], r["messages"]) for r in rows]
    t0 = time.perf_counter()
    outputs = engine.generate(requests, sampling)
    seconds = time.perf_counter() - t0
    tokens = sum(o[0].completion_tokens for o in outputs)
    engine.close()
    return {"tok_s": tokens / seconds, "startup_s": startup, "tokens": tokens, "seconds": seconds}


def raypost_pipeline(model: str, rows, sampling, engine_config, resources) -> dict:
    from raypost.generation.pipeline import generate

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        summary = generate(rows, model=model, output_dir=out, engine=engine_config, sampling=sampling,
                           resources=resources, progress=False)
        seconds = time.perf_counter() - started
    return {"tokens": summary.completion_tokens, "seconds": seconds}


def ray_data_llm_direct(model: str, rows, sampling, engine_config, resources) -> dict:
    """Ray's processor with the same settings, no raypost code on the data path."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from raypost.engines.vllm_engine import vllm_engine_kwargs, vllm_env
    from raypost.models import resolve_model

    config = vLLMEngineProcessorConfig(
        model_source=str(resolve_model(model)),
        engine_kwargs=vllm_engine_kwargs(engine_config),
        concurrency=resources.concurrency,
        batch_size=engine_config.batch_size,
        placement_group_config={"bundles": [{"CPU": resources.cpus_per_actor}]},
        runtime_env={"env_vars": vllm_env(on_gpu=False)},
        log_engine_metrics=False,
        # Ray's own template/tokenize/detokenize stages, kept on; at their default of one CPU
        # per actor they take both CPUs of a 2-core node and the engine never gets placed.
        chat_template_stage={"enabled": True, "num_cpus": 0.25, "concurrency": 1},
        tokenize_stage={"enabled": True, "num_cpus": 0.25, "concurrency": 1},
        detokenize_stage={"enabled": True, "num_cpus": 0.25, "concurrency": 1},
    )
    params = {"temperature": sampling.temperature, "max_tokens": sampling.max_tokens, "seed": sampling.seed}
    processor = build_processor(
        config,
        preprocess=lambda row: {"messages": row["messages"], "sampling_params": params},
        postprocess=lambda row: {"n": row["num_generated_tokens"]},
        preprocess_map_kwargs={"num_cpus": 0.25},
        postprocess_map_kwargs={"num_cpus": 0.25},
    )
    started = time.perf_counter()
    total = 0
    for batch in processor(ray.data.from_items(rows)).iter_batches(batch_size=None):
        total += int(sum(batch["n"]))
    return {"tokens": total, "seconds": time.perf_counter() - started}


def steady_rate(run, rows, small: int) -> dict:
    """Run on `small` prompts, then on all: the fixed start-up cost cancels in the difference."""
    short, full = run(rows[:small]), run(rows)
    print(json.dumps({"short": short, "full": full}), file=sys.stderr, flush=True)  # kept if a later part hangs
    tok_s = (full["tokens"] - short["tokens"]) / max(full["seconds"] - short["seconds"], 1e-9)
    return {"tok_s": tok_s, "startup_s": max(short["seconds"] - short["tokens"] / tok_s, 0.0),
            "tokens": full["tokens"], "seconds": full["seconds"],
            "end_to_end_tok_s": full["tokens"] / full["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--small-prompts", type=int, default=16, help="the short run of each pipeline")
    parser.add_argument("--transformers-prompts", type=int, default=32,
                        help="transformers is ~4x slower: fewer prompts keep the run short; tok/s is a rate")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    from raypost.engines.vllm_engine import vllm_env

    for key, value in vllm_env(on_gpu=False).items():  # the bare engine gets what the actors get
        os.environ.setdefault(key, value)

    from raypost.config import EngineConfig, Resources, SamplingConfig
    from raypost.engines.vllm_engine import vllm_available
    from raypost.models import resolve_model
    from raypost.runtime import ensure_ray

    resolve_model(args.model)  # convert once, outside every timing
    rows = load_questions(args.prompts)
    sampling = SamplingConfig(temperature=0.0, max_tokens=args.max_tokens, seed=0)
    engine_config = EngineConfig(backend="vllm", max_model_len=1024, batch_size=args.batch_size)
    resources = Resources(concurrency=1, cpus_per_actor=1)
    result: dict = {"model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens,
                    "cores": os.cpu_count()}

    tf = bare_engine("transformers", args.model, rows[: args.transformers_prompts], sampling,
                     engine_config.model_copy(update={"batch_size": 16}))
    result["transformers_tok_s"] = round(tf["tok_s"], 1)
    result["transformers_startup_s"] = round(tf["startup_s"], 1)
    if not vllm_available():
        result["error"] = "vLLM is not installed: only the transformers baseline ran"
        print(json.dumps(result))
        return

    from raypost.engines.shm_cleanup import removing_orphaned_segments

    with removing_orphaned_segments(wait_seconds=15.0):  # what the direct ray.data.llm runs leave
        bare = bare_engine("vllm", args.model, rows, sampling, engine_config)
        ensure_ray()
        pipeline = steady_rate(lambda part: raypost_pipeline(args.model, part, sampling, engine_config, resources),
                               rows, args.small_prompts)
        direct = steady_rate(lambda part: ray_data_llm_direct(args.model, part, sampling, engine_config, resources),
                             rows, args.small_prompts)
    result.update(
        raypost_tok_s=round(pipeline["tok_s"], 1),
        bare_engine_tok_s=round(bare["tok_s"], 1),
        ratio=round(pipeline["tok_s"] / bare["tok_s"], 3),
        ray_data_llm_tok_s=round(direct["tok_s"], 1),
        raypost_vs_ray_data_llm=round(pipeline["tok_s"] / direct["tok_s"], 3),
        vllm_vs_transformers=round(bare["tok_s"] / tf["tok_s"], 2),
        startup_s={"raypost": round(pipeline["startup_s"], 1), "bare_engine": round(bare["startup_s"], 1),
                   "ray_data_llm": round(direct["startup_s"], 1)},
        end_to_end_tok_s={"raypost": round(pipeline["end_to_end_tok_s"], 1),
                          "ray_data_llm": round(direct["end_to_end_tok_s"], 1)},
        completion_tokens={"raypost": pipeline["tokens"], "bare_engine": bare["tokens"],
                           "ray_data_llm": direct["tokens"]},
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
