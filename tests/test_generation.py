"""Teacher generation on Ray Data: 2 actors, resumption exactly once, rejected rows, vLLM on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raypost import metrics, records, schema
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.generation.pipeline import generate, generate_files
from raypost.records import DataError, PromptFormat

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


QUESTION = PromptFormat(prompt_field="question", id_field="qid", reference_field="answer")


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def questions(start: int, stop: int) -> list[dict]:
    return [{"qid": f"id{i}", "question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(start, stop)]


def test_bad_inputs_stop_before_any_actor_starts_naming_the_path(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def refused(inputs, fmt=QUESTION) -> str:
        with pytest.raises(DataError) as error:
            generate_files(inputs, fmt, model="gold", output_dir=tmp_path / "out",
                           engine=EngineConfig(backend="reference"), progress=False)
        return str(error.value)

    assert refused(str(tmp_path / "missing.jsonl")) == f"{tmp_path / 'missing.jsonl'}: no such file or directory"
    assert refused(str(tmp_path / "shards" / "*.jsonl")).endswith("the pattern matches no file")
    assert "no filesystem for nosuchfs:// is installed" in refused("nosuchfs://bucket/prompts.jsonl")
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"text": ["a question"], "qid": ["x"]}), wrong)
    assert refused(str(wrong)) == f"{wrong}: no column 'question' (prompt_field); the file has ['qid', 'text']"
    assert not (tmp_path / "out").exists()


def test_inputs_resolve_from_globs_directories_and_uris(tmp_path):
    from raypost.generation.config import InputConfig
    from raypost.generation.sources import resolve_inputs

    shards = [write_jsonl(tmp_path / "shards" / f"{name}.jsonl", questions(0, 2)) for name in ("b", "a")]
    expected = tuple(sorted(str(p) for p in shards))
    assert resolve_inputs(str(tmp_path / "shards" / "*.jsonl")).paths == expected
    assert resolve_inputs(str(tmp_path / "shards")).paths == expected
    assert resolve_inputs(f"file://{tmp_path}/shards/*.jsonl").paths == expected
    # a recipe names the input the same ways, and an input that matches nothing fails as it loads
    assert InputConfig(path=f"file://{tmp_path}/shards/a.jsonl").path == f"file://{tmp_path}/shards/a.jsonl"
    with pytest.raises(ValueError, match="the pattern matches no file"):
        InputConfig(path=str(tmp_path / "nothing" / "*.jsonl"))


def test_a_dataset_saved_by_hf_datasets_is_read_from_its_arrow_files(tmp_path, ray_local):
    """`Dataset.save_to_disk` output (Arrow stream files beside dataset_info.json/state.json) as
    the input directory: every row generated, a row without its question set aside as `file:row N`;
    a DatasetDict's directory asks for one split, and a split without the prompt column is
    refused naming its Arrow file, before any actor starts."""
    import datasets

    rows = [*questions(0, 5), {"qid": "id5", "question": None, "answer": "10"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))
    assert arrow
    summary = generate_files(str(tmp_path / "saved"), QUESTION, model="gold", output_dir=tmp_path / "out",
                             engine=EngineConfig(backend="reference"), progress=False)
    got = {(r["id"], r["sample_index"]): r for r in records.read_rows(tmp_path / "out")}
    assert sorted(got) == [(f"id{i}", 0) for i in range(5)]
    assert got[("id3", 0)]["reference"] == "6" and got[("id3", 0)]["response"] == "6"
    assert summary.rows_written == 5 and summary.rows_rejected == 1
    (rejected,) = records.read_rows(tmp_path / "out" / "rejected")
    assert rejected["source"] == f"{arrow[-1]}:row 5" and "question" in rejected["reason"]

    datasets.DatasetDict({"train": datasets.Dataset.from_list(questions(0, 2))}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=f"{tmp_path / 'dict'}: a DatasetDict; point at one split directory"):
        generate_files(str(tmp_path / "dict"), QUESTION, model="gold", output_dir=tmp_path / "out2",
                       engine=EngineConfig(backend="reference"), progress=False)
    datasets.Dataset.from_list([{"qid": "x", "text": "hi"}]).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(DataError, match=r"\.arrow: no column 'question' \(prompt_field\)"):
        generate_files(str(tmp_path / "other"), QUESTION, model="gold", output_dir=tmp_path / "out3",
                       engine=EngineConfig(backend="reference"), progress=False)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def generate_shards(shards: Path, out: Path, n: int):
    """The reference engine over every JSONL shard of `shards`, `n` samples a prompt, into `out`."""
    return generate_files(str(shards / "*.jsonl"), QUESTION, model="gold", output_dir=out,
                          engine=EngineConfig(backend="reference", batch_size=3),
                          sampling=SamplingConfig(n=n, max_tokens=8), progress=False)


def test_prompt_files_are_read_on_the_workers_and_resume_by_key(tmp_path, ray_local):
    """Two JSONL shards with bad lines and an id repeated across them, then a rerun asking one
    more sample per prompt: every (id, sample) once, every bad row set aside with file and line."""
    shards = tmp_path / "shards"
    first = write_jsonl(shards / "a.jsonl", [*questions(0, 6), "{not json", {"qid": "idx", "answer": "1"}])
    second = write_jsonl(shards / "b.jsonl", [questions(3, 4)[0], *questions(6, 10)])
    out = tmp_path / "gen"

    def run(n: int):
        return generate_shards(shards, out, n)

    summary = run(2)
    rows = records.read_rows(out)
    assert sorted((r["id"], r["sample_index"]) for r in rows) == sorted((f"id{i}", k) for i in range(10) for k in (0, 1))
    assert {r["response"] for r in rows if r["id"] == "id3"} == {"6"}
    assert summary.rows_written == 20 and summary.rows_rejected == 3 and summary.rows_total == 20
    reasons = {r["source"]: r["reason"] for r in records.read_rows(out / "rejected")}
    assert reasons[f"{first}:7"].startswith("invalid JSON")
    assert reasons[f"{first}:8"] == "missing field 'question'"
    assert reasons[f"{second}:1"] == "duplicate id"   # id3 came first in a.jsonl

    again = run(3)
    rows = records.read_rows(out)
    assert sorted((r["id"], r["sample_index"]) for r in rows) == sorted((f"id{i}", k) for i in range(10) for k in range(3))
    assert again.rows_written == 10 and again.rows_skipped == 20
    assert len(records.read_rows(out / "rejected")) == 3   # set aside again under the same names, not twice


def exported_metrics(ray) -> str:
    """What Ray's metrics agent on this node exports (Prometheus text), as a dashboard scrapes it."""
    import urllib.request

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_a_process_reports_its_own_peak_memory_not_the_one_of_the_process_that_started_it():
    """What the benches and the training workers report as a process's peak: a child started by
    a process holding 400 MB reports its own few MB (`ru_maxrss` would report the parent's)."""
    held = bytearray(400 * 1024 * 1024)
    held[::4096] = b"x" * len(held[::4096])   # touched, so resident
    code = "from raypost.metrics import peak_rss_mb; print(peak_rss_mb())"
    own = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               cwd=REPO).stdout)
    assert own < 100
    del held


def test_rows_committed_and_rejected_reach_rays_metrics_beside_ray_datas_own(tmp_path, ray_local):
    """Where a run is watched on a cluster: the workers count what they commit and set aside as
    Ray metrics tagged with the output, and Ray Data's own per-operator metrics carry the run's
    name. Metrics are exported every few seconds: wait for them, up to two minutes."""
    shards = tmp_path / "shards"
    write_jsonl(shards / "a.jsonl", [*questions(0, 6), "{not json", {"qid": "idx", "answer": "1"}])
    out = tmp_path / "gen"
    summary = generate_shards(shards, out, 2)
    assert summary.rows_written == 12 and summary.rows_rejected == 2

    def total(text: str, name: str, output: Path) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and f'output="{output}"' in line)

    name = metrics.dataset_name("generate", str(out))
    deadline, seen = time.monotonic() + 120, None
    while time.monotonic() < deadline:
        text = exported_metrics(ray_local)
        seen = (total(text, "ray_raypost_rows_committed_total", out),
                total(text, "ray_raypost_rows_rejected_total", out / "rejected"),
                any(line.startswith("ray_data_") and f'dataset="{name}' in line for line in text.splitlines()))
        if seen == (12.0, 2.0, True):
            break
        time.sleep(2)
    assert seen == (12.0, 2.0, True)


def test_a_resume_past_the_broadcast_limit_subtracts_by_a_hash_join(tmp_path, ray_local, monkeypatch):
    """Above BROADCAST_KEYS committed keys a rerun subtracts them with Ray Data's hash join (set
    to 1 here, so 10 keys take that path), with a shard whose every line is bad in the input (its
    block leaves nothing to generate): every (id, sample) once, the bad lines set aside once."""
    from raypost.generation import pipeline

    shards = tmp_path / "shards"
    write_jsonl(shards / "a.jsonl", questions(0, 6))
    write_jsonl(shards / "b.jsonl", ["{not json", "{nor this"])
    write_jsonl(shards / "c.jsonl", questions(6, 10))
    out = tmp_path / "gen"

    def run(n: int):
        return generate_shards(shards, out, n)

    first = run(1)
    assert first.rows_written == 10 and first.rows_rejected == 2
    monkeypatch.setattr(pipeline, "BROADCAST_KEYS", 1)
    again = run(2)
    rows = records.read_rows(out)
    assert sorted((r["id"], r["sample_index"]) for r in rows) == sorted((f"id{i}", k) for i in range(10) for k in (0, 1))
    assert again.rows_written == 10 and again.rows_skipped == 10
    assert len(records.read_rows(out / "rejected")) == 2


NODE_SCRIPT = """
import sys
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.generation.pipeline import generate_files
from raypost.records import PromptFormat

if __name__ == "__main__":
    s = generate_files(sys.argv[1], PromptFormat(prompt_field="question", id_field="qid", reference_field="answer"),
                       model="gold", output_dir=sys.argv[2], engine=EngineConfig(backend="reference", batch_size=20),
                       sampling=SamplingConfig(max_tokens=8, n=2), resources=Resources(concurrency=2), progress=False)
    print("WRITTEN", s.rows_written, flush=True)
"""


@pytest.mark.slow
def test_generation_on_two_nodes_survives_losing_one(tmp_path):
    """Engine actors on two worker nodes; one node is removed while its actor is known to be
    mid-batch (it holds at a gate after its 2nd part): the job finishes on the other node and
    every (id, sample) is there exactly once."""
    from ray.cluster_utils import Cluster

    script = tmp_path / "gen.py"
    script.write_text(NODE_SCRIPT)
    source = write_jsonl(tmp_path / "prompts.jsonl", questions(0, 600))
    out, gate = tmp_path / "gen", tmp_path / "gate"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        # 3 CPUs a worker: the survivor must hold both engine actors and still run the light tasks
        workers = [cluster.add_node(num_cpus=3) for _ in range(2)]
        cluster.wait_for_nodes()
        env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": cluster.address,
               "RAYPOST_GENERATE_FAULT": f"hold:2:{gate}"}
        process = subprocess.Popen([sys.executable, str(script), str(source), str(out)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            arrived = []
            for _ in range(6000):   # both actors reach the gate (an event, bounded at 10 minutes)
                arrived = sorted(tmp_path.glob("gate.arrived-*"))
                if len(arrived) == 2 or process.poll() is not None:
                    break
                time.sleep(0.1)
            assert len(arrived) == 2, process.communicate()[0][-3000:] if process.poll() is not None else arrived
            nodes = {path.name.split("-")[1] for path in arrived}
            assert nodes <= {w.node_id for w in workers} and len(nodes) == 2   # one actor on each worker node
            cluster.remove_node(next(w for w in workers if w.node_id == sorted(nodes)[0]))
            gate.touch()
            output, _ = process.communicate(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == 0, output[-3000:]
        keys = [(r["id"], r["sample_index"]) for r in records.read_rows(out)]
        assert sorted(keys) == sorted((f"id{i}", k) for i in range(600) for k in (0, 1))
    finally:
        cluster.shutdown()


RESUME_SCRIPT = """
import signal, sys
from raypost.config import EngineConfig, Resources, SamplingConfig
from raypost.generation.pipeline import generate_files
from raypost.records import PromptFormat
from raypost.runtime import ensure_ray

if __name__ == "__main__":
    # a background job of a non-interactive shell starts with SIGINT ignored, and a child
    # inherits that: Ctrl-C must behave as it does for a user at a terminal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ensure_ray(num_cpus=2)
    # the reference engine: what is tested is the interrupt and the resume, not a model
    s = generate_files(sys.argv[1], PromptFormat(prompt_field="question", id_field="qid", reference_field="answer"),
                       model="gold", output_dir=sys.argv[2], engine=EngineConfig(backend="reference", batch_size=50),
                       sampling=SamplingConfig(max_tokens=8), resources=Resources(concurrency=1), progress=False)
    print("WRITTEN", s.rows_written, "SKIPPED", s.rows_skipped, flush=True)
"""


@pytest.mark.slow
def test_interrupted_and_killed_runs_resume_and_every_id_lands_exactly_once(tmp_path):
    """Ctrl-C, then SIGKILL of the driver, each at a known point (the engine actor has committed
    its Nth part), not after a sleep: a fast machine must not finish before the fault arrives."""
    script = tmp_path / "gen.py"
    script.write_text(RESUME_SCRIPT)
    source = write_jsonl(tmp_path / "prompts.jsonl", questions(0, 2000))
    out = tmp_path / "gen"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(script), str(source), str(out)]

    interrupted = subprocess.Popen(command, env={**env, "RAYPOST_GENERATE_FAULT": "INT:2"}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output, _ = interrupted.communicate(timeout=600)
    assert interrupted.returncode != 0 and "WRITTEN" not in output, output[-2000:]
    assert records.count_rows(out) == 100 and len(records.part_files(out)) == 2, output[-2000:]

    killed = subprocess.run(command, env={**env, "RAYPOST_GENERATE_FAULT": "KILL:3"}, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert "WRITTEN" not in killed.stdout and records.count_rows(out) == 250   # 3 more parts of 50

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ids = [r["id"] for r in records.read_rows(out)]
    assert len(ids) == 2000 and set(ids) == {f"id{i}" for i in range(2000)}
    assert "WRITTEN 1750 SKIPPED 250" in result.stdout


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
