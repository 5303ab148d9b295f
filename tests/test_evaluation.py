"""Evaluation harness: extraction, pass@k, loaders, prompts, compare, and end-to-end runs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from raypost import records
from raypost.config import EngineConfig, SamplingConfig
from raypost.evaluation import prompts as P
from raypost.evaluation.benchmarks import BenchmarkOptions, get_benchmark
from raypost.evaluation.loaders import load_gsm8k, load_humaneval, load_mbpp, load_mmlu, mbpp_split
from raypost.evaluation.scoring import extract_letter, pass_at_k, score_gsm8k, score_letter

REPO = Path(__file__).resolve().parents[1]


# --- pass@k ------------------------------------------------------------------------------

@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
    (10, 3, 1, 0.3),                  # pass@1 is c / n
    (5, 2, 2, 1 - 3 / 10),            # 1 - C(3,2)/C(5,2)
    (4, 1, 2, 1 - 3 / 6),             # 1 - C(3,2)/C(4,2)
    (10, 5, 3, 1 - 10 / 120),         # 1 - C(5,3)/C(10,3)
    (20, 1, 10, 0.5),                 # 1 - C(19,10)/C(20,10) = 1 - 10/20
    (5, 0, 3, 0.0),
    (3, 3, 2, 1.0),
    (6, 4, 3, 1.0),                   # n - c < k: every draw of 3 holds a correct one
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_impossible_arguments():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


# --- extraction --------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("C", "C"), ("(B)", "B"), ("D.", "D"), ("B) 12", "B"),
    ("The answer is (C).", "C"), ("Answer: B", "B"), ("answer: **A**", "A"), ("Final answer: C", "C"),
    ("A good way to see it: 2+2=4, so the answer is D.", "D"),   # the article "A" is not an answer
    ("The answer is C. Wait, no, the answer is D.", "D"),        # the last statement wins
    ("Between (A) and (B), I pick... Answer: A", "A"),
    ("**B**", "B"), ("I think it is B.", "B"),
    ("A number divisible by 3", None), ("(A) 4\n(B) 8", None), ("I do not know", None), ("", None),
])
def test_letter_extraction_on_tricky_outputs(text, expected):
    assert extract_letter(text) == expected


def test_letter_extraction_falls_back_to_option_text():
    assert extract_letter("12", ["8", "12", "16", "20"]) == "B"
    assert score_letter("12.", "B", ["8", "12", "16", "20"]).correct


@pytest.mark.parametrize("response, reference, correct", [
    ("So she has 1,000 apples left. The answer is 1,000.", "1000", True),   # thousands separator
    ("She pays $18.", "18", True),                                          # currency sign
    ("Each box weighs 12 kg.", "12", True),                                 # units
    ("The temperature drops to -3 degrees.", "-3", True),                   # negative
    ("3 + 4 = 7 and 7 * 2 = 14. The answer is 14.", "14", True),            # several numbers: the final one
    ("#### 72", "72", True),
    ("The answer is 2.50", "2.5", True),
    ("The answer is 18.\nQ: Tom has 5 apples", "18", True),                 # text after the stated answer
    ("Half of it: 1/2", "0.5", True),                                        # fraction
    ("The answer is 15.", "16", False),
])
def test_gsm8k_scoring_on_tricky_outputs(response, reference, correct):
    score = score_gsm8k(response, reference)
    assert score.correct is correct
    assert score.error_kind == (None if correct else "wrong_answer")


def test_gsm8k_no_number_is_no_answer():
    score = score_gsm8k("I cannot solve this.", "5")
    assert (score.correct, score.extracted, score.error_kind) == (False, None, "no_answer")


# --- MMLU gold letters -------------------------------------------------------------------

def test_mmlu_gold_letters_score_100_percent(shared_data):
    loaded = load_mmlu(shared_data / "mmlu")
    assert len(loaded.items) == 748 and not loaded.rejected
    for template in ("{}", "The answer is ({}).", "Answer: {}", "**{}**"):
        scores = [score_letter(template.format(i.reference), i.reference, i.fields["choices"]) for i in loaded.items]
        assert sum(s.correct for s in scores) == len(loaded.items), template


# --- loaders -----------------------------------------------------------------------------

def test_loaders_read_the_real_files(shared_data):
    gsm8k = load_gsm8k(shared_data / "gsm8k" / "train.jsonl")
    assert len(gsm8k.items) == 7473 and not gsm8k.rejected
    assert gsm8k.items[0].reference == "72"
    heldout = load_gsm8k(REPO / "data" / "gsm8k" / "heldout.jsonl")
    quickstart = load_gsm8k(REPO / "data" / "gsm8k" / "quickstart.jsonl")
    assert len(heldout.items) == 100
    assert not {i.fields["question"] for i in heldout.items} & {i.fields["question"] for i in quickstart.items}

    full = load_mbpp(shared_data / "mbpp" / "mbpp.jsonl")
    sanitized = load_mbpp(shared_data / "mbpp" / "sanitized-mbpp.json")
    assert (len(full.items), len(sanitized.items)) == (974, 427)
    assert len(mbpp_split(full.items, "test")) == 500
    assert all(11 <= i.fields["task_id"] <= 510 for i in mbpp_split(sanitized.items, "test"))

    humaneval = load_humaneval(shared_data / "humaneval" / "HumanEval.jsonl.gz")
    assert len(humaneval.items) == 164 and humaneval.items[0].fields["entry_point"] == "has_close_elements"

    mmlu = load_mmlu(shared_data / "mmlu")
    assert {i.subject for i in mmlu.items} == {"elementary_mathematics", "high_school_mathematics",
                                                "college_mathematics"}
    assert len(load_mmlu(shared_data / "mmlu", "dev").items) == 15


def test_loaders_set_bad_rows_aside_with_file_line_and_reason(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("\n".join([
        json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}),
        "{not json",
        json.dumps({"question": "no final", "answer": "it is 3"}),
        json.dumps({"answer": "#### 4"}),
        json.dumps({"question": "big", "answer": "#### 1,200"}),
    ]) + "\n")
    loaded = load_gsm8k(gsm)
    assert [i.reference for i in loaded.items] == ["2", "1200"]
    reasons = {r.source: r.reason for r in loaded.rejected}
    assert set(reasons) == {f"{gsm}:2", f"{gsm}:3", f"{gsm}:4"}
    assert "invalid JSON" in reasons[f"{gsm}:2"] and "####" in reasons[f"{gsm}:3"]
    assert "question" in reasons[f"{gsm}:4"]

    mmlu = tmp_path / "algebra_test.csv"
    mmlu.write_text('"What is\n2+2?",3,4,5,6,B\nshort,row,B\nQ?,1,2,3,4,E\nQ2?,1,2,3,4,d\n', encoding="utf-8")
    loaded = load_mmlu(mmlu)
    assert [(i.fields["question"], i.reference, i.subject) for i in loaded.items] == [
        ("What is\n2+2?", "B", "algebra"), ("Q2?", "D", "algebra")]
    assert [(r.source, r.reason.split(",")[0]) for r in loaded.rejected] == [
        (f"{mmlu}:3", "expected 6 columns (question"), (f"{mmlu}:4", "answer must be one of A")]

    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text("\n".join([
        json.dumps({"text": "t", "code": "x=1", "task_id": 11, "test_list": ["assert x == 1"], "test_setup_code": ""}),
        json.dumps({"text": "t", "code": "x=1", "task_id": 12, "test_list": []}),
        json.dumps({"text": "t", "code": "x=1", "task_id": 11, "test_list": ["assert 1"]}),
    ]) + "\n")
    loaded = load_mbpp(mbpp)
    assert [i.id for i in loaded.items] == ["mbpp/11"]
    assert [(r.source, r.reason) for r in loaded.rejected] == [
        (f"{mbpp}:2", "field 'test_list' must be a non-empty list of strings"), (f"{mbpp}:3", "duplicate id")]

    humaneval = tmp_path / "he.jsonl.gz"
    with gzip.open(humaneval, "wt") as handle:
        handle.write(json.dumps({"task_id": "T/0", "prompt": "def f():\n", "test": "", "entry_point": "f"}) + "\n")
    loaded = load_humaneval(humaneval)
    assert not loaded.items and "'test'" in loaded.rejected[0].reason and loaded.rejected[0].source == f"{humaneval}:1"


# --- prompts -----------------------------------------------------------------------------

def test_gsm8k_prompts_zero_and_four_shot_never_show_the_evaluated_item(shared_data):
    bench = get_benchmark("gsm8k")
    heldout = REPO / "data" / "gsm8k" / "heldout.jsonl"
    items = load_gsm8k(heldout).items[:3]
    zero, stop = bench.prompts(items, heldout, BenchmarkOptions(shots=0, prompt_style="chat"))
    assert len(zero[0]) == 1 and items[0].fields["question"] in zero[0][0]["content"] and stop == []
    four, _ = bench.prompts(items, heldout, BenchmarkOptions(shots=4, prompt_style="chat"))
    assert [m["role"] for m in four[0]] == ["user", "assistant"] * 4 + ["user"]
    assert four[0][1]["content"].endswith("The answer is 6.")
    # exemplars drawn from a file that holds the evaluated items skip them
    from_file, _ = bench.prompts(items, heldout, BenchmarkOptions(shots=4, shots_path=str(heldout), prompt_style="chat"))
    shown = " ".join(m["content"] for m in from_file[0][:-1])
    assert not any(i.fields["question"] in shown for i in items) and "<<" not in shown
    text, stop = bench.prompts(items, heldout, BenchmarkOptions(shots=4, prompt_style="completion"))
    assert text[0][0]["content"].startswith("Q: There are 15 trees") and text[0][0]["content"].endswith("\nA:")
    assert "\nQ:" in stop


def test_mbpp_prompt_uses_the_paper_format_and_shots(shared_data):
    path = shared_data / "mbpp" / "sanitized-mbpp.json"
    bench = get_benchmark("mbpp")
    items = mbpp_split(load_mbpp(path).items, "test")[:2]
    texts, stop = bench.prompts(items, path, BenchmarkOptions(prompt_style="completion"))
    text = texts[0][0]["content"]
    assert text.count("You are an expert Python programmer, and here is your task:") == 4
    assert text.count("[DONE]") == 3 and text.endswith("[BEGIN]\n") and stop == ["[DONE]"]
    assert items[0].fields["test_list"][0] in text
    assert "Write a function to find the shared elements" in text  # task 2, the paper's first shot


# --- compare -----------------------------------------------------------------------------

def _fake_run(directory: Path, model: str, correct: list[bool], benchmark: str = "gsm8k",
              subjects: list[str] | None = None) -> Path:
    rows = [{"benchmark": benchmark, "id": f"q{i}", "subject": subjects[i] if subjects else "", "sample_index": 0,
             "correct": c,
             "error_kind": None if c else "wrong_answer"} for i, c in enumerate(correct)]
    records.write_part(directory / "items", rows)
    (directory / "summary.json").write_text(json.dumps(
        {"benchmark": benchmark, "model": model, "metrics": {"pass@1": sum(correct) / len(correct)}}))
    return directory


def test_compare_paired_bootstrap_on_constructed_runs(tmp_path):
    from raypost.evaluation.compare import compare, paired_bootstrap

    import numpy as np

    base = _fake_run(tmp_path / "base", "base", [False] * 60)
    better = _fake_run(tmp_path / "better", "better", [i % 2 == 0 for i in range(60)])
    same = _fake_run(tmp_path / "same", "same", [False] * 60)
    table = compare(base, better)
    row = next(line for line in table.splitlines() if line.startswith("| gsm8k"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["gsm8k", "pass@1", "0.00", "50.00", "+50.00"] and cells[6] == "60"
    low, high = (float(x) for x in cells[5].strip("[]").split(","))
    assert 30 < low < 50 < high < 70          # roughly +/- 2 standard errors (12.9 points)
    assert "[+0.00, +0.00]" in compare(base, same)
    # paired: a constant shift has a zero-width interval however noisy the items are
    a = np.random.default_rng(1).random(40)
    assert paired_bootstrap(a, a + 0.1) == pytest.approx((0.1, 0.1))
    # runs over different items are compared on the shared ones, and say so
    partial = _fake_run(tmp_path / "partial", "partial", [True] * 30)
    assert "compared on the 30 shared items" in compare(base, partial)


def test_compare_reports_each_level_with_its_own_paired_interval(tmp_path):
    from raypost.evaluation.compare import compare

    levels = [f"level{1 + i % 2}" for i in range(40)]
    base = _fake_run(tmp_path / "base", "base", [False] * 40, "arith", levels)
    # level1 items all improve, level2 items stay wrong
    better = _fake_run(tmp_path / "better", "better", [lv == "level1" for lv in levels], "arith", levels)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in compare(base, better).splitlines() if line.startswith("| arith")}
    assert rows["arith"][4] == "+50.00"
    assert rows["arith level1"][4] == "+100.00" and rows["arith level1"][5] == "[+100.00, +100.00]"
    assert rows["arith level2"][4] == "+0.00" and rows["arith level2"][6] == "20"


def test_eval_compare_cli(tmp_path, capsys):
    from raypost.cli import main

    a = _fake_run(tmp_path / "a", "a", [True, False, True, False])
    b = _fake_run(tmp_path / "b", "b", [True, True, True, False])
    assert main(["eval", "compare", str(a), str(b), "--bootstrap-samples", "200"]) == 0
    out = capsys.readouterr().out
    assert "| gsm8k | pass@1 | 50.00 | 75.00 | +25.00 |" in out
    assert main(["eval", "compare", str(a), str(tmp_path / "missing")]) == 2


# --- end to end through Ray --------------------------------------------------------------

@pytest.mark.slow
def test_mmlu_gold_letters_through_the_harness_score_100(tmp_path, ray_local, shared_data):
    """The reference engine answers with each item's gold letter: the whole pipeline must agree."""
    from raypost.evaluation import evaluate

    summary = evaluate("mmlu_math", model="gold", engine=EngineConfig(backend="reference", batch_size=256),
                       output_dir=tmp_path / "gold", data_path=shared_data / "mmlu", progress=False)
    assert summary.items == 748 and summary.metrics["pass@1"] == 1.0
    assert set(summary.by_subject.values()) == {1.0}
    assert summary.pass_at_1_ci95 == [1.0, 1.0] and all(ci == [1.0, 1.0] for ci in summary.by_subject_ci95.values())


@pytest.mark.slow
def test_end_to_end_tiny_model_writes_every_output(tmp_path, ray_local, tiny_model):
    from raypost.evaluation import evaluate

    run = tmp_path / "gsm8k"
    summary = evaluate("gsm8k", model=str(tiny_model), engine=EngineConfig(backend="transformers", batch_size=4),
                       output_dir=run, limit=4, seed=3, shots=4,
                       sampling=SamplingConfig(max_tokens=8), progress=False)
    assert summary.items == 4 and 0.0 <= summary.metrics["pass@1"] <= 1.0
    items = records.read_rows(run / "items")
    assert len(items) == 4
    assert {"prompt", "response", "extracted", "correct", "error_kind"} <= set(items[0])
    assert all(r["response"] is not None for r in items)
    assert all(r["correct"] or r["error_kind"] in ("no_answer", "wrong_answer") for r in items)
    assert json.loads((run / "summary.json").read_text())["items"] == 4
    assert "| pass@1 |" in (run / "summary.md").read_text()
    # the same limit and seed pick the same items
    again = evaluate("gsm8k", model=str(tiny_model), engine=EngineConfig(backend="transformers", batch_size=4),
                     output_dir=run, limit=4, seed=3, shots=4, sampling=SamplingConfig(max_tokens=8), progress=False)
    assert sorted(r["id"] for r in records.read_rows(run / "items")) == sorted(r["id"] for r in items)
    assert again.metrics == summary.metrics

    loglik = evaluate("mmlu_math", model=str(tiny_model), engine=EngineConfig(backend="transformers"),
                      output_dir=tmp_path / "mmlu", limit=4, method="loglik", progress=False)
    assert loglik.items == 4 and all(r["extracted"] in "ABCD" for r in records.read_rows(tmp_path / "mmlu" / "items"))

    # prompts longer than the context: the engine produces nothing, and every sample still has its
    # item row, wrong, with the reason the generation stage gave
    short = evaluate("gsm8k", model=str(tiny_model), engine=EngineConfig(backend="transformers", max_model_len=64),
                     output_dir=tmp_path / "short", limit=3, shots=4, n=2, k=(1, 2),
                     sampling=SamplingConfig(max_tokens=8), progress=False)
    rows = records.read_rows(tmp_path / "short" / "items")
    assert sorted((r["id"], r["sample_index"]) for r in rows) == sorted((i, s) for i in {r["id"] for r in rows}
                                                                        for s in range(2))
    assert len(rows) == 6 and short.generation_errors == 6 and short.metrics == {"pass@1": 0.0, "pass@2": 0.0}
    assert all(r["error_kind"] == "generation_error" and r["response"] is None for r in rows)
    assert all("context" in r["finish_reason"] for r in rows), rows[0]["finish_reason"]


@pytest.mark.slow
def test_code_is_scored_on_the_workers_each_sample_committed_once(tmp_path, ray_local, shared_data):
    """The reference engine answers each MBPP task with its own solution: the programs run in the
    sandbox inside the scoring tasks, which commit the item rows, every (item, sample) once."""
    from raypost.evaluation import evaluate

    run = tmp_path / "mbpp"
    summary = evaluate("mbpp", model="gold", engine=EngineConfig(backend="reference", batch_size=2), output_dir=run,
                       data_path=shared_data / "mbpp" / "sanitized-mbpp.json", limit=5, n=2, k=(1, 2),
                       progress=False)
    rows = records.read_rows(run / "items")
    assert summary.items == 5 and summary.samples == 10 and summary.metrics == {"pass@1": 1.0, "pass@2": 1.0}
    assert len({(r["id"], r["sample_index"]) for r in rows}) == len(rows) == 10
    assert all(r["correct"] and r["error_kind"] is None and r["model"] == "gold" for r in rows)
    # committed by the scoring tasks, each part named by its keys (a retried task rewrites its own)
    import pyarrow.parquet as pq

    from raypost.generation.batches import _part_name

    for part in records.part_files(run / "items"):
        keys = [f"{r['id']}\x00{r['sample_index']}" for r in pq.read_table(part).to_pylist()]
        assert part.name == _part_name(keys)
    # a rerun reuses the generations and scores them again into the same rows
    again = evaluate("mbpp", model="gold", engine=EngineConfig(backend="reference", batch_size=2), output_dir=run,
                     data_path=shared_data / "mbpp" / "sanitized-mbpp.json", limit=5, n=2, k=(1, 2),
                     progress=False)
    assert again.metrics == summary.metrics
    assert sorted(r["id"] for r in records.read_rows(run / "items")) == sorted(r["id"] for r in rows)


@pytest.mark.slow
def test_eval_stage_in_a_recipe_writes_runs_and_the_table(tmp_path, ray_local, capsys):
    import yaml

    from raypost.recipe import load_recipe, run_recipe

    recipe_path = tmp_path / "eval.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "name": "evaltest", "output_dir": str(tmp_path / "runs"),
        "models": {"student": "gold-a", "extra": {"other": "gold-b"}},
        "stages": [{"kind": "eval", "name": "eval", "models": ["student", "other"],
                    "engine": {"backend": "reference"},
                    "benchmarks": [{"name": "gsm8k", "limit": 5, "shots": 0}]}],
    }))
    summaries = run_recipe(load_recipe(recipe_path))
    stage_dir = tmp_path / "runs" / "eval"
    assert (stage_dir / "student" / "gsm8k" / "summary.json").is_file()
    assert summaries["eval"]["runs"]["other"]["gsm8k"]["metrics"]["pass@1"] == 1.0
    out = capsys.readouterr().out
    assert "| gsm8k | pass@1 | 100.00 | 100.00 |" in out
    assert (stage_dir / "compare-student-vs-other.md").is_file()


@pytest.mark.slow
def test_models_of_one_architecture_share_one_engine_and_answer_as_with_their_own(tmp_path, ray_local, tiny_model):
    """A base model and another of its shape (other weights), seeded sampling: with one_engine the second is
    loaded into the first's engine in place, and every answer is the one its own engine gives.
    A model of another shape cannot join that engine, nor can tensor parallelism: the stage says
    so before any model loads."""
    import yaml

    from raypost.config import RecipeError
    from raypost.models.tiny import make_tiny_model
    from raypost.recipe import load_recipe, run_recipe

    other = make_tiny_model(tmp_path / "other", seed=1)
    wider = make_tiny_model(tmp_path / "wider", hidden_size=96)

    def run(name: str, one_engine, models=("base", "other"), tensor_parallel_size: int = 1) -> dict:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "name": name, "output_dir": str(tmp_path / name),
            "resources": {"tensor_parallel_size": tensor_parallel_size},
            "models": {"student": str(tiny_model), "extra": {"base": str(tiny_model), "other": str(other),
                                                            "wider": str(wider)}},
            "stages": [{"kind": "eval", "name": "eval", "models": list(models), "one_engine": one_engine,
                        "engine": {"backend": "transformers", "batch_size": 4},
                        "sampling": {"temperature": 1.0, "seed": 7, "max_tokens": 12},
                        "benchmarks": [{"name": "arith", "data_path": str(REPO / "data/arith/test.jsonl"),
                                        "limit": 6}]}],
        }))
        return run_recipe(load_recipe(path))["eval"]

    def answers(name: str, label: str) -> dict:
        return {r["id"]: r["response"] for r in records.read_rows(tmp_path / name / "eval" / label / "arith" / "items")}

    shared = run("shared", True)
    assert [load["how"] for load in shared["weight_loads"]] == ["in place"]
    assert shared["weight_loads"][0]["model"] == str(other)
    separate = run("separate", False)
    assert "weight_loads" not in separate
    assert answers("shared", "other") == answers("separate", "other")
    assert answers("shared", "base") == answers("separate", "base")
    assert answers("shared", "other") != answers("shared", "base")   # the load changed what the engine says
    with pytest.raises(RecipeError, match=rf"stages.eval.one_engine: {wider} has another architecture"):
        run("mixed", True, models=("base", "wider"))
    assert not (tmp_path / "mixed" / "eval" / "base").exists()
    with pytest.raises(RecipeError, match=r"stages.eval.one_engine: the shared engine is one actor without tensor"):
        run("tp", True, tensor_parallel_size=2)


def test_a_benchmark_file_that_is_not_here_stops_the_stage_before_any_model_saying_where_to_get_it(
        tmp_path, monkeypatch):
    """As in a fresh clone without ../shared: the recipe names MBPP, which the repo does not ship."""
    import yaml

    from raypost.evaluation import benchmarks
    from raypost.recipe import load_recipe, run_recipe
    from raypost.records import DataError

    monkeypatch.setattr(benchmarks, "REPO", tmp_path / "clone")   # its data/ and ../shared/data: empty
    monkeypatch.delenv("RAYPOST_EVAL_DATA", raising=False)
    recipe_path = tmp_path / "eval.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "name": "evaltest", "output_dir": str(tmp_path / "runs"), "models": {"student": "no-such-model"},
        "stages": [{"kind": "eval", "name": "eval", "models": ["student"], "engine": {"backend": "transformers"},
                    "benchmarks": [{"name": "mbpp", "limit": 2}]}],
    }))
    with pytest.raises(DataError) as error:
        run_recipe(load_recipe(recipe_path))
    message = str(error.value)
    assert message.startswith("mbpp: no data_path given and no mbpp/sanitized-mbpp.json under ")
    assert "github.com/google-research/google-research" in message and "RAYPOST_EVAL_DATA" in message
    assert str(tmp_path / "clone" / "data" / "mbpp" / "sanitized-mbpp.json") in message


def test_code_scoring_passes_reference_and_names_failures(shared_data):
    """A few items only: the full reference checks (HumanEval 164/164, MBPP >= 99%) live in the
    verify tests; this checks the harness's own extraction and error kinds on top."""
    options = BenchmarkOptions(prompt_style="chat", timeout_s=5)
    item = mbpp_split(load_mbpp(shared_data / "mbpp" / "sanitized-mbpp.json").items, "test")[0]
    responses = [f"[BEGIN]\n{item.reference}\n[DONE]", f"```python\n{item.reference}\n```",
                 "[BEGIN]\ndef oops(:\n[DONE]", "[BEGIN]\nimport math\n[DONE]"]
    scores = get_benchmark("mbpp").score([item], [{"id": item.id, "response": r} for r in responses], options)
    assert [s.error_kind for s in scores] == [None, None, "syntax_error", "runtime_error"]
    humaneval = load_humaneval(shared_data / "humaneval" / "HumanEval.jsonl.gz").items[0]
    chat = f"Here it is:\n```python\n{humaneval.fields['prompt']}{humaneval.reference}```\nDone."
    rows = [{"id": humaneval.id, "response": chat}, {"id": humaneval.id, "response": "```python\ndef f():\n  return 1\n```"}]
    scores = get_benchmark("humaneval").score([humaneval], rows, options)
    assert [s.correct for s in scores] == [True, False]
