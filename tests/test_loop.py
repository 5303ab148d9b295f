"""The closed loop on a tiny real model, the procedural teacher and real Ray Train: rounds,
the budget ledger, resume after SIGKILL in every phase, load-time errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raypost import records
from raypost.config import RecipeError
from raypost.loop.config import LoopRecipe
from raypost.loop.ledger import Caps, Ledger, Totals
from raypost.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def loop_recipe(tmp_path: Path, model: Path, name: str = "loop", **loop) -> Path:
    spec = {
        "pool": {"synth": {"n": 16, "levels": "1-2", "seed": 3}},
        "student": {"engine": {"backend": "transformers", "batch_size": 16}, "sampling": {"max_tokens": 16}},
        "teacher": {"engine": {"backend": "procedural", "batch_size": 3}, "sampling": {"max_tokens": 160}},
        "budget": {"requests": 8},
        "rounds": 2,
        "selection": {"strategy": "loss_self"},
        "train": {"method": "sft", "sft": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 256,
                                           "packing": False}},
        "eval": {"path": str(REPO / "data" / "arith" / "test.jsonl"), "limit": 2, "max_tokens": 16},
    }
    for key, value in loop.items():
        spec[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "output_dir": str(tmp_path / "runs" / "{name}"),
                                    "models": {"student": str(model)}, "loop": spec}))
    return path


def ledger_view(run_dir: Path) -> tuple[dict, list[str]]:
    ledger = Ledger(run_dir / "ledger.jsonl")
    return ledger.totals().as_dict(), sorted(ledger.entries)


# --- load-time errors (exit 2 with the field path) ------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"budget": {"requests": 0}}, "loop.budget.requests: Input should be greater than or equal to 1"),
    ({"budget": {"tokens": 100}}, "budget.tokens 100 is below one teacher request (max_tokens 160 x n 1)"),
    ({"budget": {}}, "give at least one of requests, tokens, cost_usd"),
    ({"pool": {"path": "pool.jsonl", "answer_field": None}, "selection": {"strategy": "loss_gold"}},
     "strategy 'loss_gold' needs gold answers and pool.answer_field is null"),
    ({"teacher": {"model": "gold", "engine": {"backend": "reference"}}},
     "engine.backend 'reference' only replays gold answers and cannot write new problems"),
    ({"selection": {"strategy": "loss_everything"}}, "loop.selection.strategy: Input should be 'loss_self'"),
    ({"selection": {"strategy": "judge"}, "teacher": {"model": "gold", "mode": "answer", "engine": {"backend": "reference"}}},
     "selection.strategy judge: the teacher grades the student's answers, and engine.backend 'reference' cannot grade"),
    ({"pool": {"path": "pool.jsonl", "answer_field": None}, "selection": {"learnability": {"samples": 2}}},
     "selection: learnability needs gold answers"),
    ({"teacher": {"mode": "answer", "vote": {"samples": 3}}}, "vote checks problems the teacher wrote: it needs mode: rewrite"),
    ({"teacher": {"vote": {"samples": 2, "min_agree": 3}}}, "min_agree 3 is more than samples 2"),
    ({"teacher": {"vote": {"samples": 3}}, "budget": {"tokens": 700}},
     "budget.tokens 700 is below one teacher request + its vote"),
    ({"mode": "sipf", "engines": "per_phase", "train": {"method": "orpo"}},
     "engines: per_phase is a baseline of the distill loop"),
    ({"trainer": "resident", "train": {"method": "sft", "scaling": {"num_workers": 2}}},
     "trainer: resident cannot run this train config: train.scaling.num_workers is 2"),
])
def test_a_loop_that_cannot_work_is_refused_when_it_loads(tmp_path, change, message):
    (tmp_path / "pool.jsonl").write_text(json.dumps({"question": "What is 1 + 1?"}) + "\n")
    path = loop_recipe(tmp_path, tmp_path / "model", **change)
    with pytest.raises(RecipeError) as error:
        load_recipe(path, schema=LoopRecipe)
    assert str(path) in str(error.value) and message in str(error.value)


def test_the_ledger_never_passes_a_cap_and_survives_a_torn_last_line(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", price_per_1k_tokens=2.0)
    caps = Caps(requests=3, tokens=250)
    sent = 0
    while ledger.affords(caps, worst_tokens=100):
        ledger.record([{"key": f"k{sent}", "round": 1, "seed_id": str(sent), "prompt_tokens": 40,
                        "completion_tokens": 50}])
        sent += 1
    assert sent == 2 and ledger.totals().tokens == 180   # a third would risk 280 > 250
    with pytest.raises(ValueError, match="already paid"):
        ledger.record([{"key": "k0", "round": 1, "seed_id": "0", "prompt_tokens": 1, "completion_tokens": 1}])
    with (tmp_path / "ledger.jsonl").open("a") as handle:
        handle.write('{"key": "k2", "round": 1, "se')   # the driver died mid-write
    reopened = Ledger(tmp_path / "ledger.jsonl", price_per_1k_tokens=2.0)
    assert sorted(reopened.entries) == ["k0", "k1"]
    assert reopened.totals().as_dict() == {**Totals(2, 80, 100).as_dict(), "cost_usd": 0.36}
    assert Ledger(tmp_path / "ledger.jsonl").totals().requests == 2   # the torn line is gone from the file


def test_kcenter_picks_the_seed_farthest_from_everything_taught(tiny_model):
    """Greedy k-center on real question embeddings (MiniLM): each pick is the question farthest
    from the taught ones and the picks before it."""
    import numpy as np

    from raypost.loop.strategies import Scored, embed_questions, kcenter_order, score_items
    from raypost.tasks import arith

    items = arith.synthesize(12, (1, 2, 3, 4), seed=5)
    vectors = embed_questions([i.question for i in items], "minilm")
    assert vectors.shape[0] == 12 and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    taught = [0, 5]
    order = kcenter_order(vectors, taught)
    assert sorted(order) == list(range(12)) and order[-2:] == taught   # the taught come last
    chosen = list(taught)
    for pick in order[:-2]:
        distance = lambda i: min(np.linalg.norm(vectors[i] - vectors[c]) for c in chosen)  # noqa: E731
        assert distance(pick) == pytest.approx(max(distance(i) for i in range(12) if i not in chosen))
        chosen.append(pick)
    scored = [Scored(str(i), None, None) for i in range(12)]
    scores = score_items(scored, "kcenter", "mean", seed=0, embeddings=vectors, taught=taught)
    assert sorted(range(12), key=lambda i: -scores[i]) == order


def test_the_procedural_judge_grades_by_how_far_the_answer_got():
    import random

    from raypost.config import EngineConfig, SamplingConfig
    from raypost.engines.base import Request
    from raypost.engines.judge import judge_messages, parse_grade
    from raypost.engines.procedural_engine import ProceduralEngine
    from raypost.tasks import arith

    problem, question = arith.make_problem(random.Random(1), 4)
    engine = ProceduralEngine("procedural:arith", EngineConfig(backend="procedural"))
    answers = [arith.solve(problem).text, arith.solve(problem, error_at=3).text,
               arith.solve(problem, error_at=1).text, arith.solve(problem, error_at=0).text, "no idea", ""]
    grades = [parse_grade(out[0].text) for out in engine.generate(
        [Request(str(k), judge_messages(question, a)) for k, a in enumerate(answers)], SamplingConfig(max_tokens=4))]
    # right: 10; wrong at the last step: 3 of 3 intermediate results reached; ...; no work: 1
    assert grades == [10.0, 8.0, 3.0, 1.0, 1.0, 1.0]
    with pytest.raises(arith.ParseError):
        engine.generate([Request("x", judge_messages("What is love?", "42"))], SamplingConfig(max_tokens=4))


def test_round_records_reach_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    from raypost.loop.tracking import RoundTracker
    from raypost.training.config import TrackingBlock

    record = {"round": 1, "accuracy": 0.25, "accuracy_ci95": [0.1, 0.4], "per_group": {"1": {"accuracy": 0.5}},
              "teacher_total": {"tokens": 900, "requests": 4}, "seconds": {"train": 12.5}}
    for round_index in (0, 1):   # a resumed loop: a second tracker logs to the same run
        tracker = RoundTracker(TrackingBlock(backend="mlflow"), tmp_path, "loop")
        tracker.log({**record, "round": round_index, "accuracy": 0.1 + round_index})
        tracker.close()
    client = MlflowClient(tracking_uri=(tmp_path / "tracking").as_uri())
    run_id = __import__("json").loads((tmp_path / "tracking" / "loop_run.json").read_text())["run_id"]
    history = client.get_metric_history(run_id, "accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.1), (1, 1.1)]
    assert client.get_metric_history(run_id, "accuracy.group_1")[0].value == 0.5
    assert client.get_metric_history(run_id, "teacher_total.tokens")[0].value == 900


# --- the loop itself -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_loop(tiny_model, tmp_path_factory, ray_local):
    """One uninterrupted loop: the reference for the crash test below."""
    from raypost.loop.controller import run_loop

    tmp_path = tmp_path_factory.mktemp("loop")
    recipe = load_recipe(loop_recipe(tmp_path, tiny_model), schema=LoopRecipe)
    rounds = run_loop(recipe)
    return recipe, rounds


@pytest.mark.slow
def test_a_loop_spends_its_budget_round_by_round_and_reports(finished_loop, capsys):
    from raypost.loop.controller import run_loop

    recipe, rounds = finished_loop
    run_dir = recipe.resolved_output_dir()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["teacher_total"]["requests"] == 0
    # 8 requests in 2 even rounds: 4 each, never more; each seed at most once per round
    assert [r["teacher_round"]["requests"] for r in rounds[1:]] == [4, 4]
    totals, keys = ledger_view(run_dir)
    assert totals["requests"] == 8 and len({k.split("/")[2] for k in keys if "/r1/" in k}) == 4
    assert rounds[2]["teacher_total"] == totals
    # every written problem was verified by the task's own solver; all of them pass here
    assert rounds[1]["kept"] == 4 and rounds[1]["rejected"] == 0
    assert rounds[1]["train_rows"] == 4 and rounds[2]["train_rows"] == 8   # train_on: all
    assert rounds[2]["model"].endswith("round_2/train/model") and rounds[1]["train_steps"] == 2
    # the student engine stayed up: round 2's weights were loaded into it in place; the trainer too
    assert rounds[2]["weight_sync"]["how"] == "in place"
    assert [r["trainer"] for r in rounds[1:]] == ["resident", "resident"]
    # the student's answers went through the generation stage: committed as Parquet parts, one
    # row per seed with its logprobs, and loss_self (computed on the workers) is their mean NLL
    answers = records.read_rows(run_dir / "round_1" / "answers")
    pool_ids = {json.loads(line)["id"] for line in (run_dir / "pool.jsonl").read_text().splitlines()}
    assert sorted(a["id"] for a in answers) == sorted(pool_ids)
    scores = json.loads((run_dir / "round_1" / "scores.json").read_text())
    for answer in answers:
        losses = [-t["logprob"] for t in answer["logprobs"]]
        assert losses and scores["scores"][answer["id"]] == pytest.approx(sum(losses) / len(losses))
    # loss_self picked the seeds the base student was least sure of
    picked = [k.split("/")[2] for k in keys if "/r1/" in k]
    assert min(scores["scores"][p] for p in picked) >= max(v for s, v in scores["scores"].items() if s not in picked)
    assert set(rounds[1]["per_group"]) == {"1", "2", "3", "4"} and rounds[1]["eval_items"] == 8
    # so did its eval answers, each checked on the workers: the verdicts are those of the answers
    from raypost.evaluation.scoring import score_gsm8k

    evaluated = {r["id"]: r for r in records.read_rows(run_dir / "round_1" / "eval_answers")}
    verdicts = [json.loads(line) for line in (run_dir / "round_1" / "eval_items.jsonl").read_text().splitlines()]
    assert len(evaluated) == len(verdicts) == 8 and all(v["error"] is None for v in verdicts)
    assert all(v["correct"] == score_gsm8k(evaluated[v["id"]]["response"], evaluated[v["id"]]["reference"]).correct
               for v in verdicts)
    html = (run_dir / "report" / "index.html").read_text()
    assert "<svg" in html and "<script" not in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    assert json.loads((run_dir / "report" / "report.json").read_text())["runs"]
    pngs = {p.name for p in (run_dir / "report").glob("*.png")}
    assert pngs == {"accuracy_vs_tokens.png", "accuracy_per_group.png", "budget_per_round.png"}
    assert html.count("src='data:image/png;base64,") == 2   # the two that the SVG does not show

    capsys.readouterr()
    again = run_loop(recipe)   # a finished loop reruns nothing and pays nothing
    assert again == rounds and ledger_view(run_dir)[0] == totals
    assert "engines up" not in capsys.readouterr().out

    changed = load_recipe(recipe.source, ["loop.budget.requests=9"], schema=LoopRecipe)
    with pytest.raises(RecipeError, match=r"holds a loop with other settings \(changed: budget\)"):
        run_loop(changed)


@pytest.mark.slow
def test_a_loop_killed_in_every_phase_ends_with_the_ledger_of_an_uninterrupted_run(finished_loop, tiny_model,
                                                                                     tmp_path, ray_local):
    reference_recipe, reference_rounds = finished_loop
    path = loop_recipe(tmp_path, tiny_model)
    run_dir = tmp_path / "runs" / "loop"
    # each driver joins the session's Ray, as `ray job submit` drivers join a cluster's: killing
    # the driver must not lose what it finished, whoever owns the cluster
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "raypost", "loop", str(path)]
    # SIGKILL of the driver at a known point of each phase (see raypost/loop/faults.py)
    answers_before = None
    for fault in ["score:1", "teacher:1:1", "train:1:1", "eval:1"]:
        process = subprocess.Popen(command, env={**env, "RAYPOST_LOOP_FAULT": fault}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        output, _ = process.communicate(timeout=600)
        try:
            os.killpg(process.pid, signal.SIGKILL)   # what the dead driver left (a user's kill -9 -PGID)
        except ProcessLookupError:
            pass
        assert process.returncode == -signal.SIGKILL, f"{fault}: rc {process.returncode}\n{output[-3000:]}"
        if fault == "score:1":   # killed once the student's answers were committed, before the ranking was
            answers_before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "round_1" / "answers").glob("part-*")}
            assert answers_before and not (run_dir / "round_1" / "scores.json").exists()
        if fault == "teacher:1:1":   # killed after round 1's first teacher batch: that batch is paid, no more
            assert ledger_view(run_dir)[0]["requests"] == 3
            # the rerun scored from the committed answers: not one was generated again
            assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "round_1" / "answers").glob("part-*")} == answers_before
    # the last run goes to the end; in this process, which has the modules loaded already
    from raypost.loop.controller import run_loop

    run_loop(load_recipe(path, schema=LoopRecipe))

    assert ledger_view(run_dir) == ledger_view(reference_recipe.resolved_output_dir())
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "model", "weight_sync")}  # noqa: E731
    assert [strip(r) for r in rounds] == [strip(r) for r in reference_rounds]


@pytest.mark.slow
def test_a_teacher_endpoint_that_goes_down_stops_the_loop_paying_nothing_and_a_rerun_finishes(
        tiny_model, tmp_path, ray_local, fake_openai):
    """An OpenAI-compatible teacher over real HTTP. While it answers 503 to everything, round 1
    stops with a clear error and the ledger holds nothing; once it is back, the rerun pays the
    budget exactly once."""
    from raypost.errors import StageError
    from raypost.loop.controller import run_loop
    from tests.fake_openai import FakeOpenAI

    # the endpoint echoes its prompt ending "#0": a gold answer of 0 makes the echo verify
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"question": f"Q{k}: what is {k} minus {k}?", "answer": f"{k} - {k} = 0\n#### 0"})
                            + "\n" for k in range(6)))
    path = loop_recipe(tmp_path, tiny_model, name="http", rounds=1,
                       pool={"path": str(pool), "group_by": None, "system_prompt": None},
                       teacher={"model": "teacher-model", "mode": "answer", "sampling": {"max_tokens": 16},
                                "engine": {"backend": "openai", "base_url": fake_openai, "max_retries": 0,
                                           "batch_size": 2}},
                       budget={"requests": 4}, selection={"strategy": "random"})
    run_dir = tmp_path / "runs" / "http"
    FakeOpenAI.down = True
    with pytest.raises(StageError, match=r"teacher teacher-model: every request of a batch failed .*HTTP 503"):
        run_loop(load_recipe(path, schema=LoopRecipe))
    assert ledger_view(run_dir)[0]["requests"] == 0 and FakeOpenAI.served == 0
    FakeOpenAI.down = False
    rounds = run_loop(load_recipe(path, schema=LoopRecipe))
    assert ledger_view(run_dir)[0]["requests"] == 4 and FakeOpenAI.served == 4
    assert rounds[1]["kept"] == 4 and rounds[1]["train_rows"] == 4


@pytest.mark.slow
def test_judge_vote_learnability_and_per_phase_engines_in_one_round(tiny_model, tmp_path, ray_local):
    """The teacher grades every student answer (ledger entries of kind judge, outside the budget);
    the worst-graded learnable seeds go to the teacher; each written problem is kept only when the
    teacher's own answers agree (a teacher wrong 40% of the time fails some votes); every phase
    starts its own engines; each round reaches TensorBoard."""
    from raypost.loop.controller import run_loop

    path = loop_recipe(tmp_path, tiny_model, name="judged", rounds=1,
                       teacher={"engine": {"backend": "procedural", "batch_size": 3, "error_rate": 0.4},
                                "sampling": {"max_tokens": 160}, "vote": {"samples": 3, "min_agree": 3}},
                       budget={"requests": 12}, engines="per_phase", tracking={"backend": "tensorboard"},
                       selection={"strategy": "judge", "learnability": {"samples": 2, "skip": "solved"}})
    rounds = run_loop(load_recipe(path, schema=LoopRecipe))
    run_dir = tmp_path / "runs" / "judged"
    ledger = Ledger(run_dir / "ledger.jsonl")
    kinds = {}
    for entry in ledger.entries.values():
        kinds.setdefault(entry["kind"], []).append(entry)
    # every one of the 16 seeds was graded once; grades are the simulator's (1-10)
    assert len(kinds["judge"]) == 16 and {e["seed_id"] for e in kinds["judge"]} == {i["id"] for i in
                                                                                     map(json.loads, (run_dir / "pool.jsonl").read_text().splitlines())}
    grades = {e["seed_id"]: float(e["texts"][0]) for e in kinds["judge"]}
    assert all(1 <= g <= 10 for g in grades.values())
    # the budget: 12 requests = written problems plus their votes; judging sits outside it
    record = rounds[1]
    assert len(kinds["answer"]) + len(kinds["vote"]) == record["teacher_total"]["requests"] <= 12
    assert len(kinds["vote"]) == len(kinds["answer"]) > 0 and all(len(e["texts"]) == 3 for e in kinds["vote"])
    assert record["judge_round"]["requests"] == 16 and record["teacher_total"]["tokens"] == ledger.totals().tokens
    # the seeds sent were the worst-graded (ties broken by id); no seed was unlearnable here
    assert record["unlearnable"] == 0 and len(kinds["answer"]) == 6
    # the learnability samples went through the generation stage: 2 per seed, each once
    sampled = records.read_rows(run_dir / "round_1" / "learnability")
    assert sorted((r["id"], r["sample_index"]) for r in sampled) == sorted((g, i) for g in grades for i in range(2))
    picked = [e["seed_id"] for e in kinds["answer"]]
    assert max(grades[p] for p in picked) <= min(g for s, g in grades.items() if s not in picked)
    # votes: a problem is kept exactly when all 3 of the teacher's answers agree with its solution
    rejected = [json.loads(line) for line in (run_dir / "round_1" / "rejected.jsonl").read_text().splitlines()]
    assert record["kept"] + record["rejected"] == len(kinds["answer"])
    assert all(r["reason"].startswith("vote: ") for r in rejected)
    from raypost.evaluation.scoring import score_gsm8k
    from raypost.tasks import arith

    for entry in kinds["answer"]:
        solution = arith.written_problem(entry["texts"][0])[1]
        agree = sum(score_gsm8k(t, solution).correct for t in ledger.get(entry["key"] + "/vote0")["texts"])
        assert (agree == 3) == (entry["key"] not in {r["key"] for r in rejected})
    # per-phase engines: nothing was loaded in place, each phase paid its own start-up
    assert record["weight_sync"] is None and record["seconds"]["engine_start"] > 0
    assert rounds[0]["seconds"]["engine_start"] > 0
    assert list((run_dir / "tracking" / "judged").glob("events.out.tfevents*"))
