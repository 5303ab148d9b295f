"""GSM8K evaluation throughput: vLLM vs transformers on the same model and items.

    python bench/eval.py [--items 64] [--small-items 8] [--max-tokens 128] [--shots 0]

Both engines run through `raypost.evaluation.evaluate` (Ray Data engine actors), each twice:
on `--small-items` and on `--items` items. `items_per_s` is the steady rate, the difference in
items over the difference in generation wall time, so the fixed start-up (actors, model load,
vLLM compile) cancels; that start-up is reported apart, and `end_to_end_items_per_s` is what a
user sees for the full run. `vllm_over_transformers` compares steady rates. If the vLLM path
through Ray Data fails, vLLM is measured in-process (`build_engine(..., vllm)`) on the same
prompts and the JSON says so (`vllm_mode`). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def evaluate_once(backend: str, args, out: Path, items: int):
    from raypost.config import EngineConfig, SamplingConfig
    from raypost.evaluation import evaluate

    return evaluate("gsm8k", model=args.model,
                    engine=EngineConfig(backend=backend, max_model_len=2048, batch_size=args.batch_size),
                    output_dir=out / f"{backend}-{items}", limit=items, seed=0, shots=args.shots,
                    sampling=SamplingConfig(temperature=0.0, max_tokens=args.max_tokens), progress=False)


def through_ray(backend: str, args, out: Path) -> dict:
    short = evaluate_once(backend, args, out, args.small_items)
    full = evaluate_once(backend, args, out, args.items)
    rate = (args.items - args.small_items) / max(full.generation_seconds - short.generation_seconds, 1e-9)
    return {"items_per_s": rate, "startup_s": max(short.generation_seconds - args.small_items / rate, 0.0),
            "end_to_end_items_per_s": full.items_per_second, "seconds": full.generation_seconds,
            "pass@1": full.metrics["pass@1"], "engine": full.engine}


def vllm_in_process(args) -> dict:
    """Fallback: the same prompts through the in-process vLLM engine, scored the same way."""
    from raypost.config import EngineConfig, SamplingConfig
    from raypost.engines import Request, build_engine
    from raypost.evaluation.benchmarks import BenchmarkOptions, default_data_path, get_benchmark
    from raypost.evaluation.harness import resolve_prompt_style, select_subset
    from raypost.evaluation.scoring import score_gsm8k

    bench = get_benchmark("gsm8k")
    engine_config = EngineConfig(backend="vllm", max_model_len=2048, batch_size=args.batch_size)
    path = default_data_path(bench)
    options = BenchmarkOptions(shots=args.shots, prompt_style=resolve_prompt_style("auto", args.model, engine_config, None))
    items = select_subset(bench.load(path, options).items, args.items, 0)
    prompts, stop = bench.prompts(items, path, options)
    started = time.perf_counter()
    engine = build_engine(args.model, engine_config)
    try:
        outputs = engine.generate([Request(i.id, m, i.reference) for i, m in zip(items, prompts)],
                                  SamplingConfig(temperature=0.0, max_tokens=args.max_tokens, stop=stop))
    finally:
        engine.close()
    seconds = time.perf_counter() - started
    correct = sum(score_gsm8k(o[0].text, i.reference).correct for i, o in zip(items, outputs))
    return {"items_per_s": len(items) / seconds, "seconds": seconds, "pass@1": correct / len(items),
            "engine": "vllm (in-process)"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--small-items", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    result = {"benchmark": "gsm8k", "model": args.model, "items": args.items, "max_tokens": args.max_tokens,
              "shots": args.shots}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        result["transformers"] = through_ray("transformers", args, out)
        try:
            result["vllm"] = through_ray("vllm", args, out)
            result["vllm_mode"] = "ray-data"
        except Exception as error:  # the Ray Data vLLM stage may be unavailable: measure in-process
            traceback.print_exc(file=sys.stderr)
            result["vllm_ray_data_error"] = f"{type(error).__name__}: {str(error)[:300]}"
            result["vllm"] = vllm_in_process(args)
            result["vllm_mode"] = "in-process"
    result["vllm_over_transformers"] = round(result["vllm"]["items_per_s"] / result["transformers"]["items_per_s"], 3)
    for backend in ("transformers", "vllm"):
        result[backend] = {k: round(v, 3) if isinstance(v, float) else v for k, v in result[backend].items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
