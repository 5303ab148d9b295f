"""Serving benchmark: N concurrent HTTP clients against raypost on Ray Serve, vs the bare engine.

    python bench/serve.py [--model packaged:smollm2-135m-instruct] [--clients 16] [--requests 64] [--rounds 3]

Loopback only. The same GSM8K prompts go (1) through the Serve deployment by `--clients`
concurrent clients and (2) through the bare engine in this process (vLLM `LLM.generate` for the
vllm backend, `TransformersEngine.generate` in batches of `--clients` otherwise). The bare engine
runs at the clients' concurrency (vLLM `max_num_seqs=--clients`): `serve_vs_bare_tok_s` is what
Serve costs at equal batching.

Both run at once and take turns, round by round (`--rounds`), and the ratio is the median of the
rounds' ratios: on a shared machine the speed of the same run drifts by a third within minutes,
so figures taken minutes apart are not comparable. Between turns the bench waits until the idle
engine's scheduler has stopped polling. One-token replies, one at a time, alternate the same way
and measure the latency Serve adds over the engine. vLLM is then also run unconstrained (all
prompts batched at once) for reference: `serve_vs_bare_unconstrained_tok_s`. Last line: one JSON
object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def load_prompts(count: int) -> list[list[dict[str, str]]]:
    questions = []
    if GSM8K.exists():
        with GSM8K.open() as handle:
            for line in handle:
                questions.append(json.loads(line)["question"])
                if len(questions) == count:
                    break
    while len(questions) < count:
        questions.append(f"What is {len(questions)} plus {len(questions) + 3}?")
    return [[{"role": "user", "content": q}] for q in questions]


async def run_clients(url: str, model: str, prompts: list, clients: int, max_tokens: int) -> dict:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for messages in prompts:
        queue.put_nowait(messages)
    latencies: list[float] = []
    tokens = errors = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while not queue.empty():
            messages = queue.get_nowait()
            start = time.perf_counter()
            response = await http.post(url, json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                errors += 1
                continue
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "tokens": tokens, "errors": errors, "wall": wall}


def one_token_latencies_http(url: str, model: str, prompts: list, repeats: int, offset: int) -> list[float]:
    import httpx

    result = []
    with httpx.Client(timeout=120) as http:
        for i in range(offset, offset + repeats):
            body = {"model": model, "messages": prompts[i % len(prompts)], "max_tokens": 1, "temperature": 0}
            start = time.perf_counter()
            response = http.post(url, json=body)
            result.append(time.perf_counter() - start)
            response.raise_for_status()
    return result


# vLLM's scheduler busy-polls for a second after its last step; a turn starts after that.
SETTLE_S = 1.5


def open_bare_engine(model: str, args, vllm_kwargs: dict):
    from raypost.config import EngineConfig
    from raypost.engines import build_engine

    return build_engine(model, EngineConfig(backend=args.backend, max_model_len=1024, batch_size=args.clients,
                                            vllm_kwargs=vllm_kwargs))


def bare_tok_s(engine, prompts: list, max_tokens: int) -> float:
    from raypost.config import SamplingConfig
    from raypost.engines import Request

    requests = [Request(id=str(i), messages=m) for i, m in enumerate(prompts)]
    start = time.perf_counter()
    outputs = engine.generate(requests, SamplingConfig(temperature=0.0, max_tokens=max_tokens, seed=None))
    return sum(o[0].completion_tokens for o in outputs) / (time.perf_counter() - start)


def bare_one_token_latencies(engine, prompts: list, repeats: int, offset: int) -> list[float]:
    from raypost.config import SamplingConfig
    from raypost.engines import Request

    one = SamplingConfig(temperature=0.0, max_tokens=1, seed=None)
    result = []
    for i in range(offset, offset + repeats):
        start = time.perf_counter()
        engine.generate([Request(id=str(i), messages=prompts[i % len(prompts)])], one)
        result.append(time.perf_counter() - start)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct", help="model reference, or `tiny`")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="turns each for Serve and the bare engine")
    parser.add_argument("--latency-repeats", type=int, default=10, help="one-token replies per turn")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs for Ray and for the one replica")
    parser.add_argument("--high-throughput", action=argparse.BooleanOptionalAction, default=True,
                        help="Serve's HAProxy ingress and gRPC data plane, as `raypost serve` starts it (default: on)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.high_throughput:
        from raypost.serving.high_throughput import use_high_throughput_serve

        use_high_throughput_serve()

    import ray
    from ray import serve

    from raypost.engines.shm_cleanup import removing_orphaned_segments
    from raypost.serving.app import build_app
    from raypost.serving.config import ServeConfig

    model = args.model
    if model == "tiny":
        from raypost.models.tiny import make_tiny_model

        model = str(make_tiny_model(Path(tempfile.mkdtemp()) / "model"))
    prompts = load_prompts(args.requests)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # The replica gets every CPU so its torch uses as many threads as the bare engine does.
    config = ServeConfig(models=[{"name": "bench", "model": model, "backend": args.backend, "cpus_per_replica": args.cpus,
                                  "max_batch_size": args.clients, "max_model_len": 1024,
                                  "replicas": {"max_ongoing_requests": max(64, args.clients * 2)}}])
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    served_tok_s, served_rps, bare_rounds, latencies, errors = [], [], [], [], 0
    serve_one_token, bare_one_token = [], []
    # vLLM replicas are killed, not closed: their message-queue segments would stay in /dev/shm
    with removing_orphaned_segments(wait_seconds=15.0):
        started = time.perf_counter()
        serve.run(build_app(config.model_dump()), name="bench", route_prefix="/")
        startup_s = time.perf_counter() - started
        asyncio.run(run_clients(url, "bench", prompts[: args.clients], args.clients, args.max_tokens))  # warm-up
        # At the clients' concurrency (vLLM: max_num_seqs=clients), which is what Serve can batch
        # with that many clients.
        engine = open_bare_engine(model, args, {"max_num_seqs": args.clients} if args.backend == "vllm" else {})
        try:
            bare_tok_s(engine, prompts[: args.clients], args.max_tokens)  # warm-up
            for turn in range(args.rounds):
                time.sleep(SETTLE_S)
                bare_rounds.append(bare_tok_s(engine, prompts, args.max_tokens))
                time.sleep(SETTLE_S)
                served = asyncio.run(run_clients(url, "bench", prompts, args.clients, args.max_tokens))
                served_tok_s.append(served["tokens"] / served["wall"])
                served_rps.append(len(served["latencies"]) / served["wall"])
                latencies += served["latencies"]
                errors += served["errors"]
            for turn in range(args.rounds):
                offset = turn * args.latency_repeats
                time.sleep(SETTLE_S)
                bare_one_token += bare_one_token_latencies(engine, prompts, args.latency_repeats, offset)
                time.sleep(SETTLE_S)
                serve_one_token += one_token_latencies_http(url, "bench", prompts, args.latency_repeats, offset)
        finally:
            engine.close()
        serve.shutdown()
        ray.shutdown()

    unconstrained = None
    if args.backend == "vllm":  # for reference: all prompts in one call
        engine = open_bare_engine(model, args, {})
        try:
            bare_tok_s(engine, prompts[: args.clients], args.max_tokens)
            unconstrained = bare_tok_s(engine, prompts, args.max_tokens)
        finally:
            engine.close()

    ratios = [s / b for s, b in zip(served_tok_s, bare_rounds)]
    serve_tok_s = statistics.median(served_tok_s)
    result = {
        "bench": "serve",
        "model": args.model,
        "backend": args.backend,
        "clients": args.clients,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "cpus": args.cpus,
        "startup_s": round(startup_s, 2),
        "p50_latency_s": round(statistics.median(latencies), 4),
        "p99_latency_s": round(percentile(latencies, 99), 4),
        "requests_per_s": round(statistics.median(served_rps), 3),
        "tokens_per_s": round(serve_tok_s, 2),
        "errors": errors,
        "bare_tokens_per_s": round(statistics.median(bare_rounds), 2),
        "serve_vs_bare_tok_s": round(statistics.median(ratios), 3),
        "serve_vs_bare_tok_s_per_round": [round(r, 3) for r in ratios],
        "serve_tokens_per_s_per_round": [round(x, 1) for x in served_tok_s],
        "bare_tokens_per_s_per_round": [round(x, 1) for x in bare_rounds],
        "bare_unconstrained_tokens_per_s": round(unconstrained, 2) if unconstrained else None,
        "serve_vs_bare_unconstrained_tok_s": round(serve_tok_s / unconstrained, 3) if unconstrained else None,
        "one_token_p50_serve_ms": round(statistics.median(serve_one_token) * 1000, 2),
        "one_token_p50_bare_ms": round(statistics.median(bare_one_token) * 1000, 2),
        "one_token_p50_added_ms": round((statistics.median(serve_one_token) - statistics.median(bare_one_token)) * 1000, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
        # Ray Serve's switches in effect (see docs/serving.md)
        "ray_serve_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")},
    }
    print(json.dumps(result))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
