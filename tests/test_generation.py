"""Teacher generation on Ray Data: 2 actors, resumption exactly once, rejected rows, vLLM on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from raypost import records, schema
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.generation.pipeline import generate

REPO = Path(__file__).resolve().parents[1]


def prompt_rows(count: int) -> list[dict]:
    return [{"id": f"q{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], "reference": str(2 * i)}
            for i in range(count)]


def test_two_actors_write_every_row_once_with_the_schema(tiny_model, tmp_path, ray_local):
    out = tmp_path / "gen"
    summary = generate(
        prompt_rows(12), model=str(tiny_model), output_dir=out,
        engine=EngineConfig(backend="transformers", batch_size=3),
        sampling=SamplingConfig(max_tokens=4, n=2, temperature=0.8, logprobs=2, first_token_entropy=True),
        resources=Resources(concurrency=2, cpus_per_actor=0.5), progress=False,
    )
    table = records.read_table(out)
    assert table.schema.equals(schema.GENERATION_SCHEMA, check_metadata=False)
    rows = table.to_pylist()
    assert sorted((r["id"], r["sample_index"]) for r in rows) == sorted((f"q{i}", k) for i in range(12) for k in (0, 1))
    assert summary.rows_written == 24 and summary.rows_rejected == 0 and summary.rows_total == 24
    assert all(r["engine"] == "transformers" and r["model"] == str(tiny_model) for r in rows)
    assert all(r["first_token_entropy"] > 0 and len(r["logprobs"]) == r["completion_tokens"] for r in rows)
    assert summary.completion_tokens == sum(r["completion_tokens"] for r in rows)

    # a rerun of a finished job does nothing
    again = generate(prompt_rows(12), model=str(tiny_model), output_dir=out,
                     engine=EngineConfig(backend="transformers"), sampling=SamplingConfig(max_tokens=4, n=2),
                     progress=False)
    assert again.rows_written == 0 and again.rows_skipped == 24 and again.rows_total == 24


def test_bad_rows_are_set_aside_with_their_reason(tiny_model, tmp_path, ray_local):
    source = tmp_path / "prompts.jsonl"
    lines = [
        json.dumps({"question": "fine question one", "answer": "1"}),
        "{not json",
        json.dumps({"answer": "no question"}),
        json.dumps({"question": 42}),
        json.dumps({"question": "word " * 2000}),   # longer than the tiny model's 1024-token context
        json.dumps({"question": "fine question two"}),
    ]
    source.write_text("\n".join(lines) + "\n")
    loaded = records.load_prompts(source, records.PromptFormat(prompt_field="question", reference_field="answer"))
    out = tmp_path / "gen"
    summary = generate(loaded.rows, model=str(tiny_model), output_dir=out, rejected=loaded.rejected,
                       engine=EngineConfig(backend="transformers"), sampling=SamplingConfig(max_tokens=3),
                       source=str(source), progress=False)
    assert summary.rows_written == 2 and summary.rows_rejected == 4
    rejected = records.read_rows(out / "rejected")
    reasons = {r["source"].rsplit(":", 1)[-1]: r["reason"] for r in rejected}
    assert reasons["2"].startswith("invalid JSON")
    assert reasons["3"] == "missing field 'question'"
    assert "must be a string or a list of messages" in reasons["4"]
    long_reason = next(r["reason"] for r in rejected if "context" in r["reason"])
    assert "the model's context is 1024" in long_reason


def test_openai_backend_failures_become_rejected_rows(tmp_path, ray_local):
    """The reference backend has no model: a row without gold answer is set aside, the job goes on."""
    rows = prompt_rows(3)
    rows[1]["reference"] = None
    summary = generate(rows, model="gold", output_dir=tmp_path / "gen", engine=EngineConfig(backend="reference"),
                       sampling=SamplingConfig(max_tokens=10), progress=False)
    assert summary.rows_written == 2 and summary.rows_rejected == 1
    assert records.read_rows(tmp_path / "gen" / "rejected")[0]["id"] == "q1"
    assert {r["response"] for r in records.read_rows(tmp_path / "gen")} == {"0", "4"}


RESUME_SCRIPT = """
import os, signal, sys
from raypost import records
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.generation.pipeline import generate
from raypost.runtime import ensure_ray

def interrupt_after(parts):
    # Ctrl-C at a known point (right after the driver stored its Nth part), not after a sleep:
    # a fast machine must not finish every row before the interrupt arrives.
    write_part, written = records.write_part, []
    def writing_then_interrupting(*args, **kwargs):
        result = write_part(*args, **kwargs)
        if result is not None:
            written.append(result)
        if result is not None and len(written) == parts:
            os.killpg(os.getpgid(0), signal.SIGINT)
        return result
    records.write_part = writing_then_interrupting

if __name__ == "__main__":
    # a background job of a non-interactive shell starts with SIGINT ignored, and a child
    # inherits that: Ctrl-C must behave as it does for a user at a terminal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if len(sys.argv) > 4:
        interrupt_after(int(sys.argv[4]))
    ensure_ray(num_cpus=2)
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"Count to {i}"}], "reference": None}
            for i in range(int(sys.argv[3]))]
    s = generate(rows, model=sys.argv[1], output_dir=sys.argv[2], engine=EngineConfig(backend="transformers", batch_size=2),
                 sampling=SamplingConfig(max_tokens=24), resources=Resources(concurrency=1), progress=False)
    print("WRITTEN", s.rows_written, "SKIPPED", s.rows_skipped, flush=True)
"""


@pytest.mark.slow
def test_interrupted_run_resumes_and_every_id_lands_exactly_once(tiny_model, tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(RESUME_SCRIPT)
    out = tmp_path / "gen"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(script), str(tiny_model), str(out), "40"]
    process = subprocess.Popen([*command, "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    output, _ = process.communicate(timeout=600)
    assert process.returncode != 0 and "WRITTEN" not in output, output[-2000:]   # it was interrupted mid-run
    assert len(records.part_files(out)) == 2, output[-2000:]
    done_before = records.count_rows(out)
    assert 0 < done_before < 40

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ids = [r["id"] for r in records.read_rows(out)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(40))
    assert f"WRITTEN {40 - done_before} SKIPPED {done_before}" in result.stdout


VLLM_SCRIPT = """
import json, sys
from raypost import records
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.generation.pipeline import generate
if __name__ == "__main__":
    rows = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], "reference": str(2 * i)}
            for i in range(6)]
    summary = generate(
        rows, model=sys.argv[1], output_dir=sys.argv[2],
        engine=EngineConfig(backend="vllm", max_model_len=512, batch_size=4, vllm_kwargs={"enforce_eager": True}),
        sampling=SamplingConfig(max_tokens=6, n=2, temperature=0.7, logprobs=2, first_token_entropy=True),
        resources=Resources(concurrency=1, cpus_per_actor=1), progress=False,
    )
    print("SUMMARY", json.dumps(summary.as_dict()), flush=True)
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_cpu_engine_through_ray_data_llm(tiny_model, tmp_path):
    """As a user runs it: a fresh process with its own local Ray (vLLM actors, ray.data.llm)."""
    pytest.importorskip("vllm")
    script = tmp_path / "gen_vllm.py"
    script.write_text(VLLM_SCRIPT)
    out = tmp_path / "gen"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([sys.executable, str(script), str(tiny_model), str(out)], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.split("SUMMARY ", 1)[1].splitlines()[0])
    rows = records.read_rows(out)
    assert summary["engine"] == "vllm" and summary["rows_rejected"] == 0
    assert sorted((r["id"], r["sample_index"]) for r in rows) == sorted((f"q{i}", k) for i in range(6) for k in (0, 1))
    assert all(r["engine"] == "vllm" and 0 < r["completion_tokens"] <= 6 for r in rows)
    assert all(r["prompt_tokens"] > 5 and len(r["logprobs"]) == r["completion_tokens"] for r in rows)
    assert all(len(r["logprobs"][0]["top"]) == 2 and r["first_token_entropy"] is not None for r in rows)
