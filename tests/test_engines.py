"""Each engine behind the one interface: transformers, reference, openai (against a local server)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from raypost.config import EngineConfig, SamplingConfig
from raypost.engines import Request, build_engine
from raypost.engines.base import entropy_from_top_logprobs
from raypost.engines.openai_engine import EndpointError

from tests.fake_openai import FakeOpenAI

QUESTION = [{"role": "user", "content": "What is 2+2?"}]


def test_transformers_engine_samples_logprobs_and_exact_entropy(tiny_model):
    import torch

    engine = build_engine(str(tiny_model), EngineConfig(backend="transformers"))
    outputs = engine.generate([Request("a", QUESTION), Request("b", [{"role": "user", "content": "Hi"}])],
                              SamplingConfig(max_tokens=5, n=2, temperature=0.9, logprobs=3, first_token_entropy=True))
    assert [len(o) for o in outputs] == [2, 2]
    first = outputs[0][0]
    assert first.completion_tokens == len(first.logprobs) <= 5
    assert first.prompt_tokens > 5 and first.finish_reason in ("stop", "length")
    assert len(first.logprobs[0].top) == 3
    # a random model is close to uniform: entropy near log(vocab)
    vocab = engine.tokenizer.vocab_size
    assert 0.5 * math.log(vocab) < first.first_token_entropy <= math.log(len(engine.tokenizer)) + 1e-3
    greedy = engine.generate([Request("a", QUESTION)], SamplingConfig(max_tokens=4))
    again = engine.generate([Request("a", QUESTION)], SamplingConfig(max_tokens=4))
    assert greedy[0][0].text == again[0][0].text
    engine.close()


def test_reference_engine_answers_from_gold_and_counts_calls():
    engine = build_engine("gold", EngineConfig(backend="reference"))
    out = engine.generate([Request("a", QUESTION, reference="four #### 4")], SamplingConfig(max_tokens=50))
    assert out[0][0].text == "four #### 4" and engine.calls == 1
    with pytest.raises(ValueError, match="no reference answer"):
        engine.generate([Request("b", QUESTION)], SamplingConfig())


def test_entropy_from_top_logprobs_accounts_for_the_tail():
    assert entropy_from_top_logprobs([math.log(0.5), math.log(0.5)]) == pytest.approx(math.log(2))
    # 0.5 listed + 0.5 unlisted: the tail is one bucket
    assert entropy_from_top_logprobs([math.log(0.5)]) == pytest.approx(math.log(2))


def test_openai_engine_retries_429_and_5xx_and_keeps_logprobs(fake_openai, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-test")
    config = EngineConfig(backend="openai", base_url=fake_openai, api_key_env="TEACHER_KEY", max_concurrency=4,
                          max_retries=3)
    engine = build_engine("teacher-model", config)
    requests = [Request(str(i), [{"role": "user", "content": text}]) for i, text in enumerate(["flaky1", "flaky2", "calm"])]
    outputs = engine.generate(requests, SamplingConfig(n=2, logprobs=2, first_token_entropy=True))
    assert [o[0].text for o in outputs] == ["echo flaky1 #0", "echo flaky2 #0", "echo calm #0"]
    assert outputs[0][1].text == "echo flaky1 #1"
    assert FakeOpenAI.failures["flaky1"] == 2 and FakeOpenAI.failures["calm"] == 1
    assert outputs[2][0].prompt_tokens == 7 and outputs[2][0].logprobs[0].top[1] == ("say", math.log(0.25))
    assert outputs[2][0].first_token_entropy == pytest.approx(entropy_from_top_logprobs([math.log(0.5), math.log(0.25)]))
    assert set(FakeOpenAI.seen_auth) == {"Bearer sk-test"}
    engine.close()


def test_openai_engine_gives_up_with_a_clear_error(fake_openai):
    engine = build_engine("m", EngineConfig(backend="openai", base_url=fake_openai, max_retries=1))
    with pytest.raises(EndpointError, match="HTTP 500 after 1 retries"):
        engine.generate([Request("x", [{"role": "user", "content": "always-broken"}])], SamplingConfig())
    engine.close()
    unreachable = build_engine("m", EngineConfig(backend="openai", base_url="http://127.0.0.1:9/v1", max_retries=0,
                                                 timeout_s=2))
    with pytest.raises(EndpointError, match="ConnectError"):
        unreachable.generate([Request("x", QUESTION)], SamplingConfig())
    unreachable.close()


VLLM_WEIGHTS_SCRIPT = """
import json, sys, time
from raypost.config import EngineConfig, SamplingConfig
from raypost.engines import Request, build_engine
if __name__ == "__main__":
    first, other = sys.argv[1], sys.argv[2]
    config = EngineConfig(backend="vllm", max_model_len=256, vllm_kwargs={"enforce_eager": True})
    request = [Request("a", [{"role": "user", "content": "What is 2+2?"}])]
    sampling = SamplingConfig(max_tokens=4, logprobs=1)
    def logprobs():
        return [[t.token, t.logprob] for t in engine.generate(request, sampling)[0][0].logprobs]
    engine = build_engine(other, config)
    fresh = logprobs()
    engine.close()
    engine = build_engine(first, config)
    before = logprobs()
    started = time.perf_counter()
    engine.load_weights(other)
    seconds = time.perf_counter() - started
    swapped = logprobs()
    engine.load_weights(first)
    back = logprobs()
    # seeded sampling of more prompt tokens than one engine step takes: on CPUs a partly
    # prefilled seeded request used to kill the engine (its generator cannot rewind)
    seeded = SamplingConfig(n=2, temperature=1.0, seed=3, max_tokens=8)
    long = [Request(f"l{i}", [{"role": "user", "content": f"Item {i}: " + "word " * 150}]) for i in range(64)]
    passes = [[[c.text for c in out] for out in engine.generate(long, seeded)] for _ in range(2)]
    print("RESULT", json.dumps({"fresh": fresh, "before": before, "swapped": swapped, "back": back,
                                "seconds": seconds, "seeded": passes}), flush=True)
    engine.close()
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_engine_takes_new_weights_in_place(tiny_model, tmp_path):
    """The closed loop's student on vLLM: a trained checkpoint goes into the running engine (no
    restart) and it then answers as an engine started on that checkpoint does (the tiny model
    ties its word embeddings, as SmolLM2 does: its output layer must follow); the old weights back
    in give the old answers again. Seeded sampling over more prompt tokens than one engine step
    holds answers every request, the same twice."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("vllm")
    from raypost.models.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=7)
    script = tmp_path / "weights.py"
    script.write_text(VLLM_WEIGHTS_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([sys.executable, str(script), str(tiny_model), str(other)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT ", 1)[1].splitlines()[0])
    def same(a, b):
        return [t for t, _ in a] == [t for t, _ in b] and [lp for _, lp in a] == pytest.approx([lp for _, lp in b], abs=1e-4)

    assert not same(out["swapped"], out["before"])
    assert same(out["swapped"], out["fresh"]), out
    assert same(out["back"], out["before"])
    first_pass, second_pass = out["seeded"]
    assert [len(o) for o in first_pass] == [2] * 64 and first_pass == second_pass


def test_a_dead_engine_stops_the_batch_instead_of_failing_each_row():
    """One row the engine cannot answer fails alone; an engine whose core is gone (vLLM's
    EngineDeadError) stops the batch, so no run records every row as a wrong answer."""
    from raypost.engines.base import Completion, EngineDead, generate_each

    class EngineDeadError(RuntimeError):   # vLLM's name for an engine whose core process died
        pass

    class Engine:   # stands in for a backend; generate_each is what is tested
        backend = "stub"

        def __init__(self, dead: bool):
            self.dead = dead

        def generate(self, requests, sampling):
            if self.dead:
                raise EngineDeadError("EngineCore encountered an issue")
            if any(r.id == "bad" for r in requests):
                raise ValueError("prompt too long")
            return [[Completion(text=r.id, completion_tokens=1, prompt_tokens=1)] for r in requests]

    requests = [Request(i, [{"role": "user", "content": i}]) for i in ("a", "bad", "c")]
    answers = generate_each(Engine(dead=False), requests, SamplingConfig())
    assert [a if isinstance(a, str) else a[0].text for a in answers] == ["a", "ValueError: prompt too long", "c"]
    with pytest.raises(EngineDead, match="EngineDeadError"):
        generate_each(Engine(dead=True), requests, SamplingConfig())
