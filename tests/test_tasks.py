"""The arith task family, `raypost data synth`, the procedural teacher and the synth stage."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from raypost.config import EngineConfig, SamplingConfig
from raypost.engines import Request, build_engine
from raypost.evaluation.loaders import load_gsm8k
from raypost.recipe import load_recipe
from raypost.tasks import arith
from raypost.verify.math_answer import verify_math

REPO = Path(__file__).resolve().parents[1]
TEST_SET = REPO / "data" / "arith" / "test.jsonl"


def test_every_generated_question_reads_back_to_its_solution():
    for item in arith.synthesize(800, seed=3, distractors=1.0):
        problem = arith.parse_problem(item.question)
        assert problem.level == item.level
        assert arith.solve(problem).text == item.answer
        assert item.answer.splitlines()[-1].startswith("#### ")


def test_levels_grow_in_steps_and_digits():
    rng = random.Random(0)
    for level in arith.LEVELS:
        problem, _ = arith.make_problem(rng, level)
        assert problem.level == level and problem.digits <= arith.LEVEL_DIGITS[level]


def test_unreadable_questions_are_errors_not_guesses():
    with pytest.raises(arith.ParseError, match="cannot read the sentence"):
        arith.parse_problem("Ava has 3 apples. She juggles 2 apples. How many apples does Ava have now?")
    with pytest.raises(arith.ParseError, match="no arith problem"):
        arith.parse_problem("What is the capital of France?")
    with pytest.raises(arith.ParseError, match="asks no question"):
        arith.parse_problem("Ava has 3 apples. She buys 2 more apples.")


def test_shipped_test_set_is_balanced_and_never_drawn_into_training(tmp_path):
    loaded = load_gsm8k(TEST_SET)
    assert not loaded.rejected and len(loaded.items) == 300
    assert sorted({i.subject for i in loaded.items}) == ["level1", "level2", "level3", "level4"]
    assert all(sum(i.subject == f"level{k}" for i in loaded.items) == 75 for k in arith.LEVELS)
    out = tmp_path / "train.jsonl"
    result = subprocess.run([sys.executable, "-m", "raypost", "data", "synth", "arith", "--n", "2000",
                             "--levels", "1-4", "--seed", "20261202", "-o", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2000 and {r["level"] for r in rows} == {1, 2, 3, 4}
    assert not {r["question"] for r in rows} & set(arith.read_questions(TEST_SET))


@pytest.mark.parametrize("args, message", [
    (["bogus", "--n", "3"], "unknown task family 'bogus'"),
    (["arith", "--n", "0"], "--n must be at least 1"),
    (["arith", "--n", "3", "--levels", "0-9"], "each level must be 1..8"),
])
def test_data_synth_bad_input_exits_2(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "raypost", "data", "synth", *args, "-o", str(tmp_path / "x.jsonl")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "x.jsonl").exists()


def test_procedural_teacher_answers_new_questions_and_rewrites_seeds():
    engine = build_engine("procedural:arith", EngineConfig(backend="procedural"))
    items = arith.synthesize(40, seed=11)
    requests = [Request(i.id, [{"role": "system", "content": arith.SYSTEM_PROMPT},
                               {"role": "user", "content": i.question}]) for i in items]
    outputs = engine.generate(requests, SamplingConfig(max_tokens=512))
    assert all(verify_math(out[0].text, item.answer)[0] for out, item in zip(outputs, items))
    assert all(out[0].completion_tokens > 0 and out[0].prompt_tokens > 0 for out in outputs)

    seed = items[-1]
    written = engine.generate([Request("w", [{"role": "user", "content": arith.rewrite_prompt(seed.question)}])],
                              SamplingConfig(max_tokens=512))[0][0].text
    question, solution = arith.written_problem(written)
    assert question != seed.question
    problem = arith.parse_problem(question)
    assert problem.level == arith.parse_problem(seed.question).level
    assert arith.solve(problem).text == solution


def test_error_rate_makes_wrong_answers_that_verification_catches():
    engine = build_engine("procedural:arith", EngineConfig(backend="procedural", error_rate=0.5))
    items = arith.synthesize(200, seed=5)
    outputs = engine.generate([Request(i.id, [{"role": "user", "content": i.question}]) for i in items],
                              SamplingConfig(max_tokens=512))
    wrong = sum(not verify_math(o[0].text, i.answer)[0] for o, i in zip(outputs, items))
    assert 60 <= wrong <= 140   # a hash decides each answer: deterministic, about half
    again = engine.generate([Request(items[0].id, [{"role": "user", "content": items[0].question}])],
                            SamplingConfig(max_tokens=512))
    assert again[0][0].text == outputs[0][0].text


def test_procedural_teacher_rejects_what_it_cannot_read():
    engine = build_engine("procedural:arith", EngineConfig(backend="procedural"))
    with pytest.raises(arith.ParseError):
        engine.generate([Request("x", [{"role": "user", "content": "Tell me a joke."}])], SamplingConfig())
    with pytest.raises(ValueError, match="unknown task family"):
        build_engine("procedural:chess", EngineConfig(backend="procedural"))


def test_procedural_teacher_counts_with_the_students_tokenizer(tiny_model):
    engine = build_engine("procedural:arith", EngineConfig(backend="procedural", tokenizer=str(tiny_model)))
    item = arith.synthesize(1, levels=(4,), seed=2)[0]
    out = engine.generate([Request(item.id, [{"role": "user", "content": item.question}])],
                          SamplingConfig(max_tokens=10))[0][0]
    assert out.completion_tokens == 10 and out.finish_reason == "length"


def test_quickstart_is_the_testbed():
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert [s.kind for s in recipe.stages] == ["synth", "generate", "curate", "train", "train", "merge", "eval"]
    assert recipe.stages[1].engine.backend == "procedural"


def test_synth_stage_pool_feeds_the_procedural_teacher(tmp_path, capsys):
    """synth -> generate on a real local Ray: every pool problem is answered, and correctly."""
    from raypost import records
    from raypost.recipe import run_recipe

    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({
        "name": "t", "output_dir": str(tmp_path / "out"),
        "models": {"teacher": "procedural:arith"},
        "stages": [{"kind": "synth", "name": "pool", "n": 24, "seed": 4},
                   {"kind": "generate", "name": "teacher", "input": {"stage": "pool"},
                    "engine": {"backend": "procedural", "batch_size": 8}, "sampling": {"max_tokens": 512}}],
    }))
    # as a user runs it, with its own local Ray: the terminal shows raypost's lines only, and
    # what Ray and the libraries print goes to the run's log
    result = subprocess.run([sys.executable, "-m", "raypost", "run", str(path)], capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    log = tmp_path / "out" / "logs" / "driver.log"
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"logs: {log} (--verbose to show them here)" and lines[-1].startswith("done: 2 stage(s)")
    assert all(line.startswith(("logs: ", "stage ", "synth ", "generate", "done: ")) for line in lines), lines
    assert sum(line.startswith("generate [") for line in lines) <= 4   # a bar, not a line per batch
    assert "Started a local Ray instance" in log.read_text()
    summaries = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summaries["pool"]["items"] == 24
    rows = records.read_rows(tmp_path / "out" / "teacher")
    assert len(rows) == 24 and summaries["teacher"]["rows_rejected"] == 0
    assert all(verify_math(r["response"], r["reference"])[0] for r in rows)
    assert summaries["teacher"]["seconds"] >= 0

    # one stage again (as `raypost generate RECIPE` does): it is up to date, and the run's
    # summary.json keeps the other stages' summaries
    again = run_recipe(load_recipe(path), only=["teacher"])
    assert again["teacher"]["up_to_date"] and again["teacher"]["rows_written"] == 24
    assert set(json.loads((tmp_path / "out" / "summary.json").read_text())) == {"pool", "teacher"}

    # --dry-run says what would run and why, and runs nothing
    from raypost.cli import main

    assert main(["run", str(path), "stages.teacher.sampling.temperature=0.7", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "stage pool (synth): up to date",
        "stage teacher (generate): runs: changed: settings.sampling.temperature; starting fresh"]
    # another temperature is another stage: none of the old rows is reused
    hot = run_recipe(load_recipe(path, ["stages.teacher.sampling.temperature=0.7"]))
    assert hot["pool"]["up_to_date"] and not hot["teacher"].get("up_to_date")
    assert hot["teacher"]["rows_written"] == 24 and hot["teacher"]["rows_skipped"] == 0
    assert len(records.read_rows(tmp_path / "out" / "teacher")) == 24


def test_procedural_teacher_scores_100_on_the_held_out_set_per_level(tmp_path, ray_local):
    """The exact teacher through the whole eval harness on Ray: every level right, tight intervals."""
    from raypost.evaluation import evaluate

    summary = evaluate("arith", model="procedural:arith", engine=EngineConfig(backend="procedural", batch_size=100),
                       output_dir=tmp_path / "teacher", data_path=TEST_SET, progress=False)
    assert summary.items == 300 and summary.metrics["pass@1"] == 1.0
    assert summary.by_subject == {f"level{k}": 1.0 for k in arith.LEVELS}
    assert summary.by_subject_ci95["level3"] == [1.0, 1.0]
    assert "level4 pass@1 | 100.00 [100.00, 100.00]" in (tmp_path / "teacher" / "summary.md").read_text()
