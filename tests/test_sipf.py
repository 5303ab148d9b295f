"""SIPF (the loop in mode sipf) on a tiny real model and real Ray Train (ORPO): sampled paths,
Monte-Carlo step values from rollouts that continue the open assistant turn, preference pairs,
resume after SIGKILL with no rollout paid twice, and the load-time refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raypost.config import RecipeError
from raypost.loop.config import LoopRecipe, SplitConfig
from raypost.loop.ledger import Ledger
from raypost.loop.sipf import make_pairs, prefix_key, split_steps
from raypost.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def sipf_recipe(tmp_path: Path, model: Path, name: str = "sipf", **changes) -> Path:
    spec = {
        "mode": "sipf",
        "pool": {"synth": {"n": 4, "levels": "1", "seed": 5, "distractors": 0}},
        "student": {"engine": {"backend": "transformers", "batch_size": 16}},
        # the simulator: the procedural teacher continuing each prefix, wrong in half its rollouts
        # (drawn per question, prefix and sample by a hash): step values differ from prefix to
        # prefix on any machine, so there are pairs, whatever the tiny random student writes
        "teacher": {"engine": {"backend": "procedural", "error_rate": 0.5}},
        "sipf": {"n": 4, "k": 2, "max_tokens": 48, "rollout_max_tokens": 40, "temperature": 1.0, "eta": 0.25,
                 "simulator": "teacher",
                 # the tiny student writes no lines: a step is every 12 words
                 "split": {"by": "regex", "pattern": r"(?:\S+\s+){12}"}},
        "rounds": 1,
        "train": {"method": "orpo", "orpo": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 256}},
        "eval": {"path": str(REPO / "data" / "arith" / "test.jsonl"), "limit": 1, "max_tokens": 48},
    }
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "output_dir": str(tmp_path / "runs" / "{name}"),
                                    "models": {"student": str(model)}, "loop": spec}))
    return path


# --- pieces --------------------------------------------------------------------------------

def test_a_path_splits_into_steps_whose_prefixes_end_where_the_next_step_begins():
    text = "Ann has 3 pens.\n\nShe buys 2 more. Now 3 + 2 = 5.\n#### 5\n"
    lines = split_steps(text, SplitConfig())
    assert [text[s.start:s.end] for s in lines] == ["Ann has 3 pens.\n\n", "She buys 2 more. Now 3 + 2 = 5.\n", "#### 5\n"]
    assert lines[0].start == 0 and all(a.end == b.start for a, b in zip(lines, lines[1:])) and lines[-1].end == len(text)
    sentences = split_steps(text, SplitConfig(by="sentence"))
    assert [text[s.start:s.end].strip() for s in sentences] == [
        "Ann has 3 pens.", "She buys 2 more.", "Now 3 + 2 = 5.", "#### 5"]
    custom = split_steps("a; b; c", SplitConfig(by="regex", pattern=r";\s*"))
    assert [(s.start, s.end) for s in custom] == [(0, 3), (3, 6), (6, 7)]
    assert split_steps(" \n\n", SplitConfig()) == []


def test_pairs_take_the_widest_gaps_first_and_fresh_paths_before_reused_ones():
    paths = [{"index": i, "score": s} for i, s in enumerate([1.0, 0.5, 0.0, 0.9, 0.8])]
    pairs = [(a["index"], b["index"]) for a, b in make_pairs(paths, eta=0.3, limit=3)]
    assert pairs == [(0, 2), (3, 1), (3, 2)]
    assert make_pairs(paths, eta=1.5, limit=3) == []
    assert make_pairs([{"index": 0, "score": 0.5}, {"index": 1, "score": 0.5}], eta=0.0, limit=3) == []


@pytest.mark.parametrize("change, message", [
    ({"sipf": {"k": 0}}, "loop.sipf.k: Input should be greater than or equal to 1"),
    ({"sipf": {"delta": 1.5}}, "loop.sipf.delta: Input should be less than or equal to 1"),
    ({"sipf": {"eta": -0.1}}, "loop.sipf.eta: Input should be greater than or equal to 0"),
    ({"train": {"method": "sft"}}, "train.method must be orpo or dpo, not 'sft'"),
    ({"sipf": {"split": {"by": "regex", "pattern": "("}}}, "pattern '(':"),
    ({"pool": {"path": "pool.jsonl", "answer_field": None}}, "the pool needs gold answers"),
    ({"sipf": {"warmup_pool": {"synth": {"n": 8, "levels": "1", "seed": 4}}}}, "warmup_pool is given but warmup is not"),
    ({"sipf": {"verifier": "code"}}, "sipf.verifier code runs each path against its task's tests: the pool needs them"),
    ({"pool": {"path": "pool.jsonl", "format": "mbpp"}}, "pool.format mbpp holds code tasks: set sipf.verifier: code"),
    ({"sipf": {"reward": "prm", "prm": {"method": "sft"}}}, "prm trains a process reward model: method must be prm"),
    ({"sipf": {"reward": "prm", "prm": {"method": "prm", "prm": {"lora": {"r": 4}}}}}, "lora: not supported for prm"),
])
def test_a_sipf_loop_that_cannot_work_is_refused_when_it_loads(tmp_path, change, message):
    (tmp_path / "pool.jsonl").write_text(json.dumps({"question": "What is 1 + 1?"}) + "\n")
    path = sipf_recipe(tmp_path, tmp_path / "model", **change)
    if "pool" in change:   # replaces the synth pool instead of merging into it
        spec = yaml.safe_load(path.read_text())
        spec["loop"]["pool"] = change["pool"]
        path.write_text(yaml.safe_dump(spec))
    with pytest.raises(RecipeError) as error:
        load_recipe(path, schema=LoopRecipe)
    assert str(path) in str(error.value) and message in str(error.value)


def test_raypost_sipf_refuses_a_distill_loop(tmp_path, capsys):
    from raypost.cli import main
    spec = yaml.safe_load(sipf_recipe(tmp_path, tmp_path / "model").read_text())
    spec["loop"].update(mode="distill", budget={"requests": 2}, train={"method": "sft"})
    del spec["loop"]["sipf"]
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sipf", str(path)]) == 2
    assert "loop.mode is 'distill': run it with `raypost loop`" in capsys.readouterr().err


MBPP_TASKS = [
    {"task_id": 601, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
     "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"], "test_setup_code": ""},
    {"task_id": 602, "text": "Write a function to double a number.", "code": "def double(x):\n    return 2 * x",
     "test_list": ["assert double(4) == 8"], "test_setup_code": ""},
    {"task_id": 603, "text": "Write a function with no tests.", "code": "def f():\n    pass", "test_list": [],
     "test_setup_code": ""},
]

# the warm-up's own tasks (a question the pool also has would be left out of the warm-up)
WARMUP_TASKS = [
    {"task_id": 611, "text": "Write a function to subtract two numbers.", "code": "def sub(a, b):\n    return a - b",
     "test_list": ["assert sub(3, 2) == 1"], "test_setup_code": ""},
    {"task_id": 612, "text": "Write a function to square a number.", "code": "def square(x):\n    return x * x",
     "test_list": ["assert square(3) == 9"], "test_setup_code": ""},
]


def test_code_answers_pass_only_when_their_tests_run_to_the_end_and_near_copies_are_duplicates():
    from raypost.loop.checks import CodeCheck

    item = {"kind": "code", "tests": {"format": "mbpp", "test_list": MBPP_TASKS[0]["test_list"]}}
    good = "[BEGIN]\ndef add(a, b):\n    return a + b\n[DONE]"
    wrong = "[BEGIN]\ndef add(a, b):\n    return a - b\n[DONE]"
    early_exit = "[BEGIN]\nimport sys\ndef add(a, b):\n    sys.exit(0)\n[DONE]"
    fenced = "Here:\n```python\ndef add(a, b):\n    return b + a\n```"
    check = CodeCheck()
    assert check.check_many(item, [good, wrong, early_exit, fenced]) == [True, False, False, True]
    assert check.unusable(item) is None and check.unusable({"kind": "code", "tests": {}}) == "a code task without tests"
    # a renamed variable is within 10% of the text's length; another body is not
    renamed = good.replace("a, b", "x, b").replace("a + b", "x + b")
    assert check.duplicate(renamed, [good], 0.1) and not check.duplicate(wrong + "\n# try again", [good], 0.01)
    assert not check.duplicate("[BEGIN]\nimport math\ndef add(a, b):\n    return math.fsum([a, b])\n[DONE]",
                               [good], 0.1)


@pytest.mark.slow
def test_a_sipf_round_on_code_tasks_checks_paths_and_rollouts_in_the_sandbox(tiny_model, tmp_path, ray_local):
    """MBPP-format tasks: every sampled program and every rollout is run against its task's tests
    in the sandbox; a task without tests is set aside at load with its reason; the eval set is
    checked the same way. Round 0 is an SFT warm-up on the reference solutions of tasks of its own
    (`warmup_pool`), and round 1 samples from the warmed-up weights."""
    from raypost.loop.controller import run_loop

    pool = tmp_path / "mbpp.jsonl"
    pool.write_text("".join(json.dumps(t) + "\n" for t in MBPP_TASKS))
    warmup_tasks = tmp_path / "mbpp_warmup.jsonl"
    warmup_tasks.write_text("".join(json.dumps(t) + "\n" for t in WARMUP_TASKS))
    code_tasks = {"path": str(pool), "format": "mbpp", "group_by": None}
    path = sipf_recipe(tmp_path, tiny_model, name="code", pool=code_tasks,
                       eval={"path": str(pool), "format": "mbpp", "max_tokens": 16, "limit": None, "group_by": None},
                       sipf={"verifier": "code", "simulator": "student", "n": 2, "k": 2, "max_tokens": 24,
                             "rollout_max_tokens": 12, "split": {"by": "regex", "pattern": r"(?:\S+\s+){4}"},
                             "warmup_pool": {"path": str(warmup_tasks), "format": "mbpp", "group_by": None},
                             "warmup": {"method": "sft", "sft": {"max_steps": 2, "per_device_train_batch_size": 2,
                                                                 "max_length": 256, "packing": False}}})
    spec = yaml.safe_load(path.read_text())
    spec["loop"]["pool"] = code_tasks   # instead of the synth pool
    del spec["loop"]["teacher"]
    path.write_text(yaml.safe_dump(spec))
    rounds = run_loop(load_recipe(path, schema=LoopRecipe))
    run_dir = tmp_path / "runs" / "code"
    rejected = _rows(run_dir / "rejected" / "pool.jsonl")
    assert len(rejected) == 1 and "test_list" in rejected[0]["reason"]
    assert [r["id"] for r in _rows(run_dir / "pool.jsonl")] == ["mbpp/601", "mbpp/602"]
    paths = _rows(run_dir / "round_1" / "paths.jsonl")
    assert paths and {p["question_id"] for p in paths} <= {"mbpp/601", "mbpp/602"}
    # a random tiny model writes no working code: every path and rollout fails its tests
    assert not any(p["correct"] for p in paths)
    ledger = Ledger(run_dir / "ledger.jsonl")
    labelled = _rows(run_dir / "round_1" / "labelled.jsonl")
    assert ledger.entries and all(v == 0.0 for p in labelled for v in p["values"])
    assert rounds[1]["pairs"] == 0 and rounds[1]["train_steps"] == 0   # nothing to prefer: unchanged
    assert rounds[0]["eval_items"] == 2 and rounds[1]["accuracy"] == 0.0
    # the warm-up: SFT on the warm-up tasks' reference solutions (none of the pool's), two steps;
    # round 0 is evaluated on its weights, and round 1 sampled from them
    warmup = json.loads((run_dir / "round_0" / "train.json").read_text())
    assert warmup["rows"] == 2 and warmup["steps"] == 2
    targets = [r["messages"][-1]["content"] for r in _rows(run_dir / "round_0" / "warmup_data.jsonl")]
    assert targets == [f"[BEGIN]\n{t['code']}\n[DONE]" for t in WARMUP_TASKS]
    assert [r["id"] for r in _rows(run_dir / "warmup_pool.jsonl")] == ["mbpp/611", "mbpp/612"]
    assert rounds[0]["model"] == warmup["model"] and warmup["model"].endswith("round_0/train/model")
    assert rounds[1]["model"] == warmup["model"]   # no pairs: round 1 kept the warmed-up weights


# --- a real round --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_sipf(tiny_model, tmp_path_factory, ray_local):
    from raypost.loop.controller import run_loop

    tmp_path = tmp_path_factory.mktemp("sipf")
    recipe = load_recipe(sipf_recipe(tmp_path, tiny_model), schema=LoopRecipe)
    return recipe, run_loop(recipe)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_sipf_round_scores_steps_by_rollouts_and_trains_orpo_on_the_pairs(finished_sipf, capsys):
    from raypost.evaluation.scoring import score_gsm8k
    from raypost.loop.controller import run_loop

    recipe, rounds = finished_sipf
    run_dir = recipe.resolved_output_dir()
    assert [r["round"] for r in rounds] == [0, 1] and rounds[0]["teacher_total"]["requests"] == 0
    record = rounds[1]
    assert record["strategy"] == "sipf-process" and record["paths_sampled"] == 4 * 4
    paths = _rows(run_dir / "round_1" / "paths.jsonl")
    assert len(paths) == record["paths_unique"] <= 16
    # one rollout request per distinct (question, step prefix), the last step excluded, k each
    ledger = Ledger(run_dir / "ledger.jsonl")
    wanted = {prefix_key(recipe.name, 1, p["question_id"], p["text"][:end]) for p in paths for _, end in p["steps"][:-1]}
    assert set(ledger.entries) == wanted and wanted
    assert all(len(e["texts"]) == 2 for e in ledger.entries.values())
    assert record["teacher_total"]["tokens"] == ledger.totals().tokens > 0 and record["rollouts"] == 2 * len(wanted)
    # a step's value is the share of its rollouts (prefix + continuation) that reach the gold answer
    gold = {i["id"]: i["answer"] for i in _rows(run_dir / "pool.jsonl")}
    for path in _rows(run_dir / "round_1" / "labelled.jsonl"):
        assert len(path["values"]) == len(path["steps"]) and path["values"][-1] == float(path["correct"])
        for (_, end), value in zip(path["steps"][:-1], path["values"]):
            prefix = path["text"][:end]
            texts = ledger.entries[prefix_key(recipe.name, 1, path["question_id"], prefix)]["texts"]
            assert value == sum(score_gsm8k(prefix + t, gold[path["question_id"]]).correct for t in texts) / 2
    pairs = _rows(run_dir / "round_1" / "data.jsonl")
    assert pairs and record["pairs"] == len(pairs) == record["train_rows"] and record["train_steps"] == 2
    assert record["trainer"] == "resident"   # the loop's training actor, not a Ray Train run
    assert all(w - l >= 0.25 for w, l in (p["scores"] for p in pairs))
    assert all(p["chosen"][0]["role"] == "assistant" and p["prompt"][-1]["role"] == "user" for p in pairs)
    assert record["weight_sync"]["how"] == "in place"
    assert (run_dir / "report" / "index.html").exists()

    capsys.readouterr()
    assert run_loop(recipe) == rounds and Ledger(run_dir / "ledger.jsonl").totals() == ledger.totals()
    assert "engines up" not in capsys.readouterr().out


@pytest.mark.slow
def test_sipf_killed_while_rolling_out_resumes_with_no_rollout_paid_twice(
        finished_sipf, tiny_model, tmp_path, ray_local):
    from raypost.loop.controller import run_loop

    reference, reference_rounds = finished_sipf
    path = sipf_recipe(tmp_path, tiny_model)
    run_dir = tmp_path / "runs" / "sipf"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "raypost", "sipf", str(path)]
    reference_ledger = Ledger(reference.resolved_output_dir() / "ledger.jsonl")
    # the loop's other phases resume by the same code (tests/test_loop.py kills each of them)
    for fault in ["rollout:1:1"]:
        process = subprocess.Popen(command, env={**env, "RAYPOST_LOOP_FAULT": fault}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        output, _ = process.communicate(timeout=600)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        assert process.returncode == -signal.SIGKILL, f"{fault}: rc {process.returncode}\n{output[-3000:]}"
        if fault == "rollout:1:1":   # killed after the first batch of rollouts: that batch is kept, no more
            assert len(Ledger(run_dir / "ledger.jsonl").entries) == min(16, len(reference_ledger.entries))
    # the run that goes to the end, in this process (its modules are loaded already)
    run_loop(load_recipe(path, schema=LoopRecipe))
    ours = Ledger(run_dir / "ledger.jsonl")
    assert sorted(ours.entries) == sorted(reference_ledger.entries) and ours.totals() == reference_ledger.totals()
    lines = (run_dir / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == len(ours.entries)   # each rollout request written once
    rounds = _rows(run_dir / "rounds.jsonl")
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "model", "weight_sync")}  # noqa: E731
    assert [strip(r) for r in rounds] == [strip(r) for r in reference_rounds]


def test_process_reward_rows_label_the_last_token_of_each_step(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from raypost.training import DatasetError, load_training_rows
    from raypost.training.prm import IGNORE, encode, prompt_text

    rows = [{"prompt": [{"role": "user", "content": "Ann has 3 pens. How many?"}],
             "completions": ["Ann has 3 pens.\n", "So 3 + 1 = 4.\n", "#### 4"], "labels": [True, False, False]},
            {"prompt": "x", "completions": ["a\n", "b"], "labels": [True]},          # a label short
            {"prompt": "x", "completions": [], "labels": []}]                         # no steps
    path = tmp_path / "prm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_training_rows(path, "prm")
    assert len(loaded.rows) == 1 and [r.reason for r in loaded.rejected] == [
        "2 steps but 1 labels", "column 'completions': expected a non-empty list of non-empty step strings"]
    with pytest.raises(DatasetError, match="missing \\['labels'\\]"):
        path.write_text(json.dumps({"prompt": "x", "completions": ["a"]}) + "\n")
        load_training_rows(path, "prm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encoded = encode(tokenizer, rows[0], 1024)
    marked = [(i, label) for i, label in enumerate(encoded["labels"]) if label != IGNORE]
    assert [label for _, label in marked] == [1, 0, 0]
    # each label sits on the last token of its step: the text up to it is the prompt and the steps so far
    text = prompt_text(tokenizer, rows[0]["prompt"])
    for (position, _), upto in zip(marked, range(1, 4)):
        assert tokenizer.decode(encoded["input_ids"][:position + 1]) == text + "".join(rows[0]["completions"][:upto])


@pytest.mark.slow
def test_a_process_reward_model_learns_the_step_labels_and_ranks_the_paths(tiny_model, tmp_path, ray_local):
    """reward: prm: a token-classification head on Ray Train learns the Monte-Carlo step labels,
    is measured on held-out questions against the outcome-only baseline, and its step scores are
    the paths' values (eta above any gap: no pairs, so no ORPO fit in this test)."""
    from raypost.loop.controller import run_loop

    path = sipf_recipe(tmp_path, tiny_model, name="prm", pool={"synth": {"n": 6, "levels": "1", "seed": 5,
                                                                          "distractors": 0}},
                       sipf={"reward": "prm", "prm_holdout": 0.5, "eta": 2.0,
                             "prm": {"method": "prm", "prm": {"learning_rate": 1e-3, "max_steps": 3,
                                                              "per_device_train_batch_size": 4, "max_length": 256}}})
    rounds = run_loop(load_recipe(path, schema=LoopRecipe))
    round_dir = tmp_path / "runs" / "prm" / "round_1"
    report = json.loads((round_dir / "prm.json").read_text())
    assert report["train_paths"] > 0 and report["held_out_paths"] > 0 and report["steps"] == 3
    assert report["held_out_steps"] > 0 and 0 <= report["step_accuracy"] <= 1
    assert "outcome_baseline_accuracy" in report and rounds[1]["prm"]["train_paths"] == report["train_paths"]
    # the labels it learnt are the Monte-Carlo values cut at delta, the last step the path's outcome
    ledger = Ledger(tmp_path / "runs" / "prm" / "ledger.jsonl")
    paths = {(p["question_id"], p["index"]): p for p in _rows(round_dir / "paths.jsonl")}
    for row in _rows(round_dir / "prm_data.jsonl"):
        text = "".join(row["completions"])
        path_ = next(p for p in paths.values() if p["text"] == text)
        assert row["labels"][-1] == path_["correct"]
        end = path_["steps"][0][1]
        entry = ledger.get(prefix_key("prm", 1, path_["question_id"], text[:end]))
        if entry is not None and len(row["labels"]) > 1:
            from raypost.loop.checks import MathCheck

            pool = {i["id"]: i for i in _rows(tmp_path / "runs" / "prm" / "pool.jsonl")}
            item = pool[path_["question_id"]]
            value = sum(MathCheck().check_many(item, [text[:end] + t for t in entry["texts"]])) / len(entry["texts"])
            assert row["labels"][0] == (value > 0.5)
    # every path of the round got one score per step, and those scores are its values
    scores = {(r["question_id"], r["index"]): r["scores"] for r in _rows(round_dir / "prm_scores.jsonl")}
    assert set(scores) == set(paths) and all(len(scores[k]) == len(paths[k]["steps"]) for k in paths)
    for labelled in _rows(round_dir / "labelled.jsonl"):
        assert labelled["values"] == scores[(labelled["question_id"], labelled["index"])]
    assert rounds[1]["pairs"] == 0 and rounds[1]["train_steps"] == 0
