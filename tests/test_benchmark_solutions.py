"""The sandbox agrees with the benchmarks' authors: their reference solutions pass their own tests."""

import gzip
import json
import os

import pytest

from raypost.verify import humaneval_program, mbpp_program, run_many, verify_code

pytestmark = pytest.mark.slow

# Per-program wall clock: all reference solutions but one run in well under a second; the margin
# is for a loaded 2-core machine. MBPP 123 (amicable numbers below 9999, brute force) needs
# ~28 s there and is the one expected timeout: within the 1% the threshold allows.
TIMEOUT_S = 10


def _failures(tasks, results):
    return {t: r.detail if r.status == "timeout" else f"{r.status}: {r.detail}"
            for t, r in zip(tasks, results) if r.status != "pass"}


def test_humaneval_canonical_solutions_pass_all(shared_data):
    path = shared_data / "humaneval" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f]
    assert len(problems) == 164
    programs = [humaneval_program(p["prompt"], p["canonical_solution"], p["test"], p["entry_point"])
                for p in problems]
    results = run_many(programs, max_workers=2, timeout_s=TIMEOUT_S)
    failures = _failures([p["task_id"] for p in problems], results)
    assert not failures, failures


def test_humaneval_wrong_solution_fails(shared_data):
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        problem = json.loads(f.readline())
    spec = {"format": "humaneval", "prompt": problem["prompt"], "test": problem["test"],
            "entry_point": problem["entry_point"]}
    assert verify_code(problem["canonical_solution"], spec) == (True, "pass")
    ok, reason = verify_code("    return not " + problem["canonical_solution"].strip().split("return ")[-1], spec)
    assert not ok and reason.startswith("fail")
    # a chat-style answer: the whole function in a fenced block
    full = "```python\n" + problem["prompt"] + problem["canonical_solution"] + "```\nDone."
    assert verify_code(full, spec) == (True, "pass")


def test_sanitized_mbpp_reference_code_passes(shared_data):
    tasks = json.loads((shared_data / "mbpp" / "sanitized-mbpp.json").read_text())
    programs = [mbpp_program(t["code"], t["test_list"], "", t["test_imports"]) for t in tasks]
    results = run_many(programs, max_workers=2, timeout_s=TIMEOUT_S)
    failures = _failures([t["task_id"] for t in tasks], results)
    rate = 1 - len(failures) / len(tasks)
    print(f"sanitized MBPP reference pass rate {rate:.4f} ({len(tasks) - len(failures)}/{len(tasks)}); failures {failures}")
    assert rate >= 0.99, failures


@pytest.mark.skipif(not os.environ.get("RAYPOST_FULL_MBPP"), reason="set RAYPOST_FULL_MBPP=1 (~4 min on 2 cores)")
def test_full_mbpp_reference_code_passes(shared_data):
    with open(shared_data / "mbpp" / "mbpp.jsonl") as f:
        tasks = [json.loads(line) for line in f]
    programs = [mbpp_program(t["code"], t["test_list"], t.get("test_setup_code", "")) for t in tasks]
    results = run_many(programs, max_workers=2, timeout_s=TIMEOUT_S)
    failures = _failures([t["task_id"] for t in tasks], results)
    rate = 1 - len(failures) / len(tasks)
    print(f"full MBPP reference pass rate {rate:.4f}; failures {failures}")
    assert rate >= 0.99, failures
