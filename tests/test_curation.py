"""Curation steps on small data with known answers, on a real local Ray and real models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raypost import records
from raypost.curation import (CurationLog, ResponseSource, dataset_from_rows, dedup, diversify,
                              entropy_route, select_responses, verify, write_training_sets)
from raypost.curation.dedup import find_duplicates
from raypost.curation.diversity import even_quotas
from raypost.curation.entropy import _student_correct, entropy_auc
from raypost.curation.rows import collect


def gsm8k_questions(shared_data: Path, n: int) -> list[dict]:
    rows = []
    with open(shared_data / "gsm8k" / "train.jsonl") as handle:
        for line in handle:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def prompt_row(row_id: str, question: str, **extra) -> dict:
    return {"id": row_id, "messages": [{"role": "system", "content": "Solve it."}, {"role": "user", "content": question}],
            **extra}


def rows_of(dataset) -> list[dict]:
    return collect(dataset).to_pylist()


# ---------------------------------------------------------------- dedup

def test_dedup_removes_planted_exact_and_near_duplicates(ray_local, shared_data):
    source = gsm8k_questions(shared_data, 40)
    rows = [prompt_row(f"q-{i}", r["question"]) for i, r in enumerate(source)]
    q3, q5, q7 = source[3]["question"], source[5]["question"], source[7]["question"]
    rows += [
        prompt_row("q-100", "  " + q3.upper().replace(" ", "   ") + " "),          # exact after normalization
        prompt_row("q-101", " ".join(["Zebra" if k == 2 else w for k, w in enumerate(q5.split())])),  # near: a word changed
        prompt_row("q-102", q7 + " Show your work."),                              # near: a sentence added
        prompt_row("q-9x", q5),                                                    # exact, but q-5 comes first
    ]
    # two samples of one prompt are one unit: both stay
    rows.append({**prompt_row("q-11", source[11]["question"]), "sample_index": 1})
    log = CurationLog()
    kept = rows_of(dedup(dataset_from_rows(rows), threshold=0.7, log=log))
    removed = {r.id: r.reason for r in log.rejected}
    assert set(removed) == {"q-100", "q-101", "q-102", "q-9x"}
    assert removed["q-100"].startswith("duplicate of q-3")
    assert removed["q-101"].startswith("duplicate of q-5")
    assert removed["q-102"].startswith("duplicate of q-7")
    assert removed["q-9x"].startswith("duplicate of q-5")
    assert sorted(r["id"] for r in kept) == sorted([f"q-{i}" for i in range(40)] + ["q-11"])
    report = log.reports["dedup"]
    assert report["units_removed"] == 4 and report["exact_units_removed"] == 2 and report["near_units_removed"] == 2
    assert report["rows_out"] == len(kept)


def test_dedup_keeps_the_first_by_natural_id_order():
    import numpy as np

    sig = np.arange(128, dtype=np.uint64)
    # "doc-10" comes after "doc-9" although it sorts before it as a plain string
    out = find_duplicates(["doc-10", "doc-9"], ["h", "h"], np.stack([sig, sig]), threshold=0.8)
    assert out == {"doc-10": ("doc-9", "exact")}


def test_dedup_threshold_is_configurable(ray_local, shared_data):
    source = gsm8k_questions(shared_data, 2)
    q = source[0]["question"]
    words = q.split()
    edited = " ".join(words[: len(words) // 2] + ["completely", "different", "ending", "here"])
    rows = [prompt_row("a-1", q), prompt_row("a-2", edited), prompt_row("a-3", source[1]["question"])]
    strict, loose = CurationLog(), CurationLog()
    assert len(rows_of(dedup(dataset_from_rows(rows), threshold=0.95, log=strict))) == 3
    assert len(rows_of(dedup(dataset_from_rows(rows), threshold=0.3, log=loose))) == 2
    assert [r.id for r in loose.rejected] == ["a-2"]


# ---------------------------------------------------------------- diversity

TOPICS = {
    "fruit": "{name} picked {n} apples and {m} pears at the orchard and sold the fruit at the market. How many pieces of fruit were sold?",
    "train": "A train leaves the station at {n} km per hour and travels for {m} hours on the railway line. How far does the train go?",
    "paint": "{name} paints {n} walls, and each wall needs {m} liters of paint from the hardware store. How many liters of paint are needed?",
}
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]


def skewed_rows() -> list[dict]:
    rows = []
    for topic, count in (("fruit", 40), ("train", 12), ("paint", 4)):
        for k in range(count):
            text = TOPICS[topic].format(name=NAMES[k % len(NAMES)], n=k + 2, m=(3 * k) % 11 + 1)
            rows.append(prompt_row(f"{topic}-{k}", text))
    return rows


@pytest.mark.parametrize("embedder", ["tfidf", "minilm"])
def test_diversity_evens_out_a_skewed_topic_mix(ray_local, embedder):
    log = CurationLog()
    kept = rows_of(diversify(dataset_from_rows(skewed_rows()), budget=12, n_clusters=3, embedder=embedder, log=log))
    topics = {}
    for r in kept:
        topics[r["id"].split("-")[0]] = topics.get(r["id"].split("-")[0], 0) + 1
    assert topics == {"fruit": 4, "train": 4, "paint": 4}
    report = log.reports["diversity"]
    assert sorted(report["cluster_sizes_before"]) == [4, 12, 40]
    assert sorted(report["cluster_sizes_after"]) == [4, 4, 4]
    assert len(log.rejected) == 56 - 12 and all(r.reason.startswith("not sampled: cluster") for r in log.rejected)
    assert {r["cluster"] for r in kept} == {0, 1, 2}


def test_even_quotas_hand_leftovers_to_larger_clusters():
    assert even_quotas([80, 15, 5], 15) == [5, 5, 5]
    assert even_quotas([80, 15, 2], 15)[2] == 2 and sum(even_quotas([80, 15, 2], 15)) == 15
    assert even_quotas([3, 1], 10) == [3, 1]


# ---------------------------------------------------------------- verify

def test_verify_adds_columns_and_sets_aside_rows_it_cannot_check(ray_local):
    rows = [
        prompt_row("v-1", "q", response="So the total is #### 1,234", reference="... #### 1234"),
        prompt_row("v-2", "q", response="The answer is \\boxed{\\frac{3}{4}}.", reference="0.75"),
        prompt_row("v-3", "q", response="She lost $5, so the change is -5 dollars.", reference="#### -5"),
        prompt_row("v-4", "q", response="It costs $12.50 in total.", reference="12.5"),
        prompt_row("v-5", "q", response="The answer is 41.", reference="#### 42"),
        prompt_row("v-6", "q", response="The answer is 41.", reference=None),
        prompt_row("v-7", "q", response="", reference="#### 3"),
    ]
    log = CurationLog()
    out = {r["id"]: r for r in rows_of(verify(dataset_from_rows(rows), kind="math", log=log))}
    assert {k: v["verified"] for k, v in out.items()} == {"v-1": True, "v-2": True, "v-3": True, "v-4": True, "v-5": False}
    assert "41" in out["v-5"]["verify_reason"]
    reasons = {r.id: r.reason for r in log.rejected}
    assert reasons == {"v-6": "nothing to verify: empty 'reference'", "v-7": "nothing to verify: empty 'response'"}
    assert log.reports["verify"]["rows_verified"] == 4


# ---------------------------------------------------------------- entropy routing

def routing_rows(n: int, wrong_cot: set[int] = frozenset()) -> list[dict]:
    rows = []
    for i in range(n):
        answer = 7 * i + 3
        words = " ".join(["many"] * (i % 5))
        question = f"Tom has {i} {words} boxes with {answer - i} marbles in total {'and ' * (i % 3)}more. How many?"
        cot = f"Step by step: {i} boxes... so {answer}. #### {answer if i not in wrong_cot else answer + 1}"
        rows.append(prompt_row(f"e-{i}", question, reference=f"We add up. #### {answer}", response=cot,
                               sample_index=0, completion_tokens=20 + i))
    return rows


def test_entropy_routing_split_follows_the_quantile_thresholds(ray_local, tiny_model):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raypost.curation.entropy import answer_only_messages
    from raypost.engines.chat import render_prompt

    rows = routing_rows(20)
    log = CurationLog()
    out = rows_of(entropy_route(dataset_from_rows(rows), model=str(tiny_model), log=log))
    report = log.reports["entropy_route"]
    low, high = report["thresholds"]
    assert len(out) == 20 and report["split"] == {"easy": 5, "medium": 10, "hard": 5}
    for r in out:
        e = r["entropy_normalized"]
        expected = "easy" if e <= low else "hard" if e > high else "medium"
        assert r["difficulty"] == expected
        if expected == "hard":
            assert r["target_source"] == "teacher_cot" and r["target"] == r["response"]
        else:
            answer = 7 * int(r["id"].split("-")[1]) + 3
            assert r["target_source"] == "short_answer" and r["target"] == f"#### {answer}"
    assert report["cot_prompts_used"] == 5 and report["cot_prompts_saved"] == 15
    hard_tokens = sum(r["completion_tokens"] for r in out if r["difficulty"] == "hard")
    assert report["cot_tokens_used"] == hard_tokens
    assert report["cot_tokens_saved"] == sum(20 + i for i in range(20)) - hard_tokens

    # the entropy is the exact full-vocabulary one of the answer-only prompt's first token
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    first = next(r for r in out if r["id"] == "e-4")
    text = render_prompt(tokenizer, answer_only_messages(rows[4]["messages"]))
    with torch.inference_mode():
        logits = model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, -1]
    log_probs = torch.log_softmax(logits.float(), -1)
    expected = float(-(log_probs.exp() * log_probs).sum())
    assert first["entropy"] == pytest.approx(expected, rel=1e-3)
    assert first["entropy_normalized"] == pytest.approx(expected / math.log(model.config.vocab_size), rel=1e-3)
    assert np.isfinite(first["entropy"])


def test_chain_of_thought_signals_are_read_from_the_students_own_reasoning(ray_local, tiny_model):
    """signal: max_cot_entropy routes by the most uncertain token of the student's own greedy
    chain of thought on the prompt as given; the same pass gives the mean entropy and the loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raypost.engines.chat import render_prompt

    rows = routing_rows(8)
    log = CurationLog()
    out = rows_of(entropy_route(dataset_from_rows(rows), model=str(tiny_model), log=log, signal="max_cot_entropy",
                                cot_max_tokens=6, low_quantile=0.25, high_quantile=0.5))
    report = log.reports["entropy_route"]
    assert report["signal"] == "max_cot_entropy" and report["split"] == {"easy": 2, "medium": 2, "hard": 4}
    assert set(report["signal_roc_auc"]) == {"max_cot_entropy", "mean_cot_entropy", "loss"}
    # recompute one row's signals from the model itself: its greedy reply, then every token's
    # full-vocabulary entropy and the chosen tokens' loss, teacher-forced in one pass
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    row = next(r for r in out if r["id"] == "e-3")
    prompt = tokenizer(render_prompt(tokenizer, rows[3]["messages"]), return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        generated = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        width = prompt["input_ids"].shape[1]
        logits = model(generated).logits[0, width - 1:-1].float()
    log_probs = torch.log_softmax(logits, -1)
    entropies = (-(log_probs.exp() * log_probs).sum(-1)).tolist()
    losses = (-log_probs.gather(1, generated[0, width:, None])[:, 0]).tolist()
    assert row["student_answer"] == tokenizer.decode(generated[0, width:], skip_special_tokens=True)
    assert row["signals"]["first_token"] is None
    assert row["signals"]["max_cot_entropy"] == pytest.approx(max(entropies), rel=1e-3) == row["entropy"]
    assert row["signals"]["mean_cot_entropy"] == pytest.approx(sum(entropies) / len(entropies), rel=1e-3)
    assert row["signals"]["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-3)


def test_entropy_routing_rejects_hard_prompts_without_a_verified_chain_of_thought(ray_local, tiny_model):
    rows = routing_rows(8, wrong_cot={2, 5})
    rows.append({**prompt_row("e-nr", "No reference here, how many?"), "response": "3", "sample_index": 0})
    log = CurationLog()
    # quantiles (0.5, 0.5): the upper half is hard
    out = {r["id"]: r for r in rows_of(entropy_route(dataset_from_rows(rows), model=str(tiny_model), low_quantile=0.5,
                                                     high_quantile=0.5, log=log))}
    reasons = {r.id: r.reason for r in log.rejected}
    for i in (2, 5):
        key = f"e-{i}"
        assert (key in reasons) != (key in out)
        if key in reasons:
            assert "no teacher chain of thought passed verification" in reasons[key]
        else:
            assert out[key]["difficulty"] != "hard"
    if "e-nr" in reasons:
        assert "no final answer in the reference" in reasons["e-nr"] or "verification" in reasons["e-nr"]
    assert len(out) + len(reasons) == 9


def test_entropy_routing_generates_the_chain_of_thought_for_hard_prompts_only(ray_local, tiny_model, tmp_path):
    """teacher: generate asks the teacher about the hard prompts alone (the saving is real): the
    workers commit those prompts, the generation stage answers them into the teacher's directory,
    and each hard prompt trains on its answer; a rerun asks for nothing again."""
    from raypost.config import EngineConfig, SamplingConfig

    rows = [{**r, "response": None, "completion_tokens": None} for r in routing_rows(12)]
    teacher_dir = tmp_path / "teacher_cot"
    teacher = ResponseSource("teacher", "generate", model="gold", output_dir=str(teacher_dir),
                             engine=EngineConfig(backend="reference", batch_size=2),
                             sampling=SamplingConfig(max_tokens=64))
    log = CurationLog()
    out = {r["id"]: r for r in rows_of(entropy_route(dataset_from_rows(rows), model=str(tiny_model), teacher=teacher,
                                                     low_quantile=0.25, high_quantile=0.5, log=log))}
    report = log.reports["entropy_route"]
    hard = sorted(i for i, r in out.items() if r["difficulty"] == "hard")
    assert len(out) == 12 and not log.rejected and len(hard) == report["split"]["hard"] == 6
    generated = records.read_rows(teacher_dir)
    assert sorted(r["id"] for r in generated) == hard                # asked about the hard prompts only
    answers = {r["id"]: r["response"] for r in generated}
    for i, row in out.items():
        if i in hard:
            assert row["target_source"] == "teacher_cot" and row["target"] == answers[i]
        else:
            assert row["target_source"] == "short_answer"
    assert report["cot_prompts_used"] == 6 and report["cot_tokens_used"] == sum(r["completion_tokens"] for r in generated)
    before = {p.name: p.stat().st_mtime_ns for p in records.part_files(teacher_dir)}
    again = CurationLog()
    entropy_route(dataset_from_rows(rows), model=str(tiny_model), teacher=teacher, low_quantile=0.25,
                  high_quantile=0.5, log=again)
    assert {p.name: p.stat().st_mtime_ns for p in records.part_files(teacher_dir)} == before
    assert again.reports["entropy_route"]["cot_tokens_used"] == 0       # nothing generated twice


def test_empty_blocks_are_left_out_before_a_shuffle(ray_local):
    """A map whose function returns no rows for a block can leave a block without columns (Ray
    Data 2.60); `materialized` leaves such blocks out, so the repartition on id that follows works."""
    import pyarrow as pa

    from raypost.curation.rows import by_id, id_groups, materialized

    table = pa.table({"id": [f"p-{i % 5}" for i in range(40)], "sample_index": list(range(40))})
    dataset = dataset_from_rows(table.to_pylist()).repartition(8).map_batches(
        lambda b: b if int(b.column("sample_index")[0].as_py()) % 10 == 0 else b.slice(0, 0), batch_format="pyarrow")
    kept = materialized(dataset)
    blocks = ray_local.get(kept.to_arrow_refs())
    assert blocks and all(b.num_rows for b in blocks)

    def count(block):
        return pa.Table.from_pylist([{"id": g[0]["id"], "n": len(g)} for g in id_groups(block)])

    counts = {r["id"]: r["n"] for r in rows_of(by_id(kept, count, 2))}
    assert sum(counts.values()) == sum(b.num_rows for b in blocks) and len(counts) == len({
        i for b in blocks for i in b.column("id").to_pylist()})


def test_entropy_auc_predicts_the_student_being_wrong():
    assert entropy_auc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 1.0
    assert entropy_auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 0.0
    assert entropy_auc([0.1, 0.2], [True, True]) is None
    assert entropy_auc([0.1, 0.2, 0.3], [True, None, False]) == 1.0


def test_student_answer_is_judged_on_its_first_paragraph_with_a_number():
    reference = "She sold 48 + 24 = <<48+24=72>>72 clips.\n#### 72"
    assert _student_correct(" 72\n\nQuestion: Tom has 5 apples and eats 2. How many are left?", reference)
    assert not _student_correct(" 70\n\nQuestion: What is 36 + 36?\nAnswer: 72", reference)
    assert _student_correct("The final answer is 72.", reference)
    assert not _student_correct("I think about it.", reference)
    assert _student_correct(None, reference) is None


# ---------------------------------------------------------------- selection and writers

def selection_rows() -> list[dict]:
    return [
        prompt_row("s-1", "What is 2 + 3?", reference="2 + 3 = <<2+3=5>>5\n#### 5", response="2 plus 3 is 6. #### 6",
                   sample_index=0),
        prompt_row("s-2", "What is 4 * 5?", reference="#### 20", response="4 times 5 is 20. #### 20", sample_index=0),
        prompt_row("s-3", "What is 9 - 1?", reference=None, response="It is 8.", sample_index=0),
    ]


def test_selection_ranks_verified_candidates_first(ray_local, tiny_model, tmp_path):
    student_dir = tmp_path / "student"
    records.write_part(student_dir, [
        {"id": "s-1", "sample_index": 0, "response": "The answer is 5."},
        {"id": "s-2", "sample_index": 0, "response": "The answer is 21."},
    ])
    log = CurationLog()
    out = {r["id"]: r for r in rows_of(select_responses(
        dataset_from_rows(selection_rows()),
        candidates=[ResponseSource("reference", "reference"), ResponseSource("teacher", "input"),
                    ResponseSource("student", "stage", stage_dir=str(student_dir))],
        scorer="perplexity", scorer_model=str(tiny_model), log=log))}
    assert out["s-1"]["best_source"] in ("reference", "student#0")
    assert "<<" not in out["s-1"]["best"]                        # GSM8K calculator notes are cleaned
    assert out["s-1"]["worst_source"] == "teacher#0"             # the only wrong answer
    assert out["s-2"]["worst_source"] == "student#0"
    assert out["s-2"]["best_source"] in ("reference", "teacher#0")
    assert all(c["score"] is not None for c in out["s-1"]["candidates"])
    # no reference: one candidate, no verifier, so no pair
    assert out["s-3"]["best"] == "It is 8." and out["s-3"]["worst"] is None
    assert log.reports["select"]["pairs"] == 2


def test_selection_generates_student_candidates_and_a_judge_rates_them(ray_local, tiny_model, tmp_path):
    from raypost.config import EngineConfig, SamplingConfig

    generated = tmp_path / "student_candidates"
    log = CurationLog()
    out = {r["id"]: r for r in rows_of(select_responses(
        dataset_from_rows(selection_rows()),
        candidates=[ResponseSource("reference", "reference"),
                    ResponseSource("student", "generate", model=str(tiny_model), output_dir=str(generated),
                                    engine=EngineConfig(backend="transformers", batch_size=4),
                                    # sampled: a random tiny model's greedy text is blank lines
                                    sampling=SamplingConfig(max_tokens=6, temperature=1.0, seed=0))],
        scorer="judge", scorer_model=str(tiny_model), scorer_engine=EngineConfig(backend="transformers"), log=log))}
    # the student's answers were generated now, one per prompt, and written like any generate stage
    assert sorted(r["id"] for r in records.read_rows(generated)) == ["s-1", "s-2", "s-3"]
    for row in out.values():
        sources = {c["source"] for c in row["candidates"]}
        assert "student#0" in sources
        assert all(0.0 <= c["score"] <= 10.0 for c in row["candidates"])  # the judge's 1-10 (0: no number)
    # the verifier still ranks first: the gold solution beats a random tiny model's text
    assert out["s-1"]["best_source"] == "reference" and out["s-1"]["worst_source"] == "student#0"
    assert out["s-3"]["best_source"] == "student#0"  # no reference: the generated answer is the only candidate


def test_a_judge_that_fails_on_one_candidate_ranks_it_last_and_the_step_goes_on(ray_local, fake_openai):
    """A judge behind a real HTTP endpoint that answers 500 for one candidate: that candidate is
    unscored (last, with its reason in the report), every prompt still gets its best answer."""
    from raypost.config import EngineConfig

    rows = selection_rows()
    rows[1]["response"] = "always-broken #### 20"   # the judge's endpoint fails on this one
    log = CurationLog()
    out = {r["id"]: r for r in rows_of(select_responses(
        dataset_from_rows(rows), candidates=[ResponseSource("reference", "reference"), ResponseSource("teacher", "input")],
        scorer="judge", scorer_model="judge-model",
        scorer_engine=EngineConfig(backend="openai", base_url=fake_openai, max_retries=0, batch_size=8), log=log))}
    assert sorted(out) == ["s-1", "s-2", "s-3"] and not log.rejected
    broken = [c for c in out["s-2"]["candidates"] if c["source"] == "teacher#0"]
    assert broken[0]["score"] is None and out["s-2"]["best_source"] == "reference"
    report = log.reports["select"]
    assert report["unscored"] == 1 and report["unscored_first"].startswith("s-2: EndpointError: ")


@pytest.mark.slow
def test_written_sets_are_accepted_by_trl_trainers(ray_local, tiny_model, tmp_path):
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    rows = [
        {**prompt_row(f"t-{i}", f"What is {i} + {i}?"), "target": f"#### {2 * i}", "best": f"{i} + {i} = {2 * i}. #### {2 * i}",
         "worst": f"It is {2 * i + 1}.", "response": f"#### {2 * i}", "verified": i % 2 == 0}
        for i in range(6)
    ]
    log = CurationLog()
    report = write_training_sets(dataset_from_rows(rows), tmp_path, log=log)
    assert report["sft"]["rows"] == 6 and report["sft"]["from"] == "target"
    assert report["kto"]["rows"] == 12 and report["kto"]["desirable"] == 6
    assert report["preference"]["rows"] == 6

    def load(name):
        return datasets.load_dataset("parquet", data_files=str(tmp_path / name / "*.parquet"), split="train")

    sft = load("sft")
    assert sft[0]["prompt"][-1]["role"] == "user" and sft[0]["completion"] == [{"role": "assistant", "content": "#### 0"}]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    common = dict(max_steps=1, per_device_train_batch_size=2, report_to=[], save_strategy="no", logging_steps=1,
                  use_cpu=True, bf16=False)
    for trainer_class, config_class, name in ((SFTTrainer, SFTConfig, "sft"), (KTOTrainer, KTOConfig, "kto"),
                                              (DPOTrainer, DPOConfig, "preference")):
        trainer = trainer_class(model=str(tiny_model), args=config_class(output_dir=str(tmp_path / f"out-{name}"), **common),
                                train_dataset=load(name), processing_class=tokenizer)
        result = trainer.train()
        assert result.global_step == 1 and math.isfinite(result.training_loss), name


# ---------------------------------------------------------------- the pipeline and the recipe stage

def test_curate_sets_aside_bad_rows_with_their_reason(ray_local, tmp_path):
    from raypost.curation import curate
    from raypost.curation.config import DedupStep, VerifyStep, WriteStep

    rows = [
        prompt_row("p-1", "What is 1 + 1?", reference="#### 2", response="#### 2"),
        prompt_row("p-2", "What is 1 + 1?", reference="#### 2", response="#### 3"),    # duplicate prompt
        prompt_row("p-3", "What is 5 + 5?", reference="#### 10", response="#### 11"),
        {"id": None, "messages": [{"role": "user", "content": "no id"}], "reference": "1", "response": "1"},
        {"id": "p-5", "messages": [], "reference": "1", "response": "1"},
        {"id": "p-6", "messages": [{"role": "system", "content": "only a system prompt"}], "reference": "1", "response": "1"},
        prompt_row("p-7", "What is 2 + 2?", reference=None, response="4"),
    ]
    summary = curate(dataset_from_rows(rows), [DedupStep(step="dedup"), VerifyStep(step="verify"), WriteStep(step="write")],
                     output_dir=tmp_path / "cur")
    rejected = {(r["id"], r["reason"]) for r in records.read_rows(tmp_path / "cur" / "rejected")}
    assert rejected == {
        (None, "missing id"),
        ("p-5", "missing messages"),
        ("p-6", "no non-empty user message"),
        ("p-2", "duplicate of p-1 (exact)"),
        ("p-7", "nothing to verify: empty 'reference'"),
        ("p-3", "sft: response failed verification"),
    }
    assert summary["rows_rejected"] == 6 and summary["rejected_by_step"]["input"] == 3
    assert summary["rows_out"] == 2
    kto = records.read_rows(tmp_path / "cur" / "kto")
    assert sorted((r["id"], r["label"]) for r in kto) == [("p-1", True), ("p-3", False)]
    assert [r["id"] for r in records.read_rows(tmp_path / "cur" / "sft")] == ["p-1"]
    assert json.loads((tmp_path / "cur" / "report.json").read_text())["rows_out"] == 2


def test_curate_reads_row_files_on_the_workers_and_sets_unreadable_lines_aside_with_file_and_line(ray_local, tmp_path):
    """JSONL shards named by a glob: typed like the generation schema (a column outside it keeps
    the type its values have), and a line that is not JSON or whose values do not fit sets
    itself aside with its file and line, as a row no step can use does; the rest is curated."""
    from raypost.curation import curate, load_rows
    from raypost.curation.config import VerifyStep, WriteStep
    from raypost.records import DataError

    good = [prompt_row(f"p-{i}", f"What is {i} + {i}?", reference=f"#### {2 * i}", response=f"#### {2 * i}",
                       sample_index=0, **({"level": i} if i % 2 else {})) for i in range(6)]
    first = tmp_path / "in" / "a.jsonl"
    first.parent.mkdir()
    first.write_text("".join(json.dumps(r) + "\n" for r in good[:3]) + "{not json\n")
    second = tmp_path / "in" / "b.jsonl"
    second.write_text("".join(json.dumps(r) + "\n" for r in good[3:])
                      + json.dumps(prompt_row("p-9", "What is 9 + 9?", sample_index="first")) + "\n"
                      + json.dumps({"id": "p-10", "messages": []}) + "\n")
    dataset, unreadable = load_rows(str(tmp_path / "in" / "*.jsonl"))
    assert unreadable == []
    summary = curate(dataset, [VerifyStep(step="verify"), WriteStep(step="write")], output_dir=tmp_path / "cur")
    rejected = {r["source"]: r for r in records.read_rows(tmp_path / "cur" / "rejected")}
    assert set(rejected) == {f"{first}:4", f"{second}:4", f"{second}:5"}
    assert rejected[f"{first}:4"]["reason"].startswith("invalid JSON")
    assert rejected[f"{second}:4"]["reason"].startswith("a value does not fit its column's type")
    assert json.loads(rejected[f"{second}:4"]["row"])["sample_index"] == "first"
    assert rejected[f"{second}:5"]["reason"] == "missing messages"
    assert summary["rows_out"] == 6 and summary["rejected_by_step"]["input"] == 3
    rows = {r["id"]: r for r in records.read_rows(tmp_path / "cur")}
    assert {i: r["level"] for i, r in rows.items()} == {f"p-{i}": (i if i % 2 else None) for i in range(6)}
    assert all(r["verified"] for r in rows.values()) and "_source" not in next(iter(rows.values()))
    for missing, message in ((tmp_path / "none.jsonl", "no such file or directory"),
                             (tmp_path / "in" / "*.parquet", "the pattern matches no file")):
        with pytest.raises(DataError, match=message):
            load_rows(str(missing))


def test_curate_rows_are_committed_by_the_workers_each_once_and_a_rerun_gives_the_same_rows(ray_local, tmp_path):
    """Curated rows, rejected rows and training sets are written by the workers, a part per block
    and step: every row is in exactly one part, and a second run into the same directory gives
    the same rows, not a second copy."""
    import pyarrow.parquet as pq

    from raypost.curation import curate
    from raypost.curation.config import DedupStep, VerifyStep, WriteStep

    rows = []
    for i in range(60):
        asked = i - 1 if i % 10 == 5 else i                 # 6 repeats of the question before
        answer = 2 * i + (1 if i % 7 == 3 else 0)           # 9 wrong answers
        rows.append(prompt_row(f"w-{i}", f"What is {asked} + {asked}?", reference=f"#### {2 * asked}",
                               response=f"#### {answer}"))
    rows.append(prompt_row("w-60", "What is 1 + 2?", reference=None, response="#### 3"))   # nothing to verify
    rows.append({"id": "w-61", "messages": [], "reference": "1", "response": "1"})           # unusable
    steps = [DedupStep(step="dedup", near=False), VerifyStep(step="verify"), WriteStep(step="write", formats=["sft", "kto"])]

    def run(out: Path):
        summary = curate(dataset_from_rows(rows).repartition(4), steps, output_dir=out)
        written = {sub: sorted((r["id"], r.get("reason")) for r in records.read_rows(out / sub))
                   for sub in ("", "rejected", "sft", "kto")}
        return summary, written

    first, parts = run(tmp_path / "cur")
    assert first["rejected_by_step"] == {"input": 1, "dedup": 6, "verify": 1, "write": 8}
    assert first["rows_out"] == 60 - 6 and first["rows_rejected"] == 16
    assert len(records.part_files(tmp_path / "cur" / "rejected")) >= 4   # input, dedup, verify, write
    for sub in ("", "rejected", "sft", "kto"):
        ids = [i for p in records.part_files(tmp_path / "cur" / sub) for i in pq.read_table(p).column("id").to_pylist()]
        assert len(ids) == len(set(ids)), sub
    rejected = {r["id"]: r["reason"] for r in records.read_rows(tmp_path / "cur" / "rejected")}
    assert rejected["w-15"] == "duplicate of w-14 (exact)" and rejected["w-60"] == "nothing to verify: empty 'reference'"
    assert rejected["w-61"] == "missing messages" and rejected["w-3"] == "sft: response failed verification"
    kto = {r["id"]: r["label"] for r in records.read_rows(tmp_path / "cur" / "kto")}
    assert len(kto) == 54 and kto["w-3"] is False and kto["w-4"] is True

    second, again = run(tmp_path / "cur")
    assert again == parts and second["rows_out"] == first["rows_out"]
    assert second["rejected_by_step"] == first["rejected_by_step"]


def generate_then_curate_recipe(tmp_path: Path, tiny_model: Path, problems: list[dict], steps: list[dict]) -> Path:
    """A recipe: the reference teacher answers `problems` (GSM8K format), then a curate stage runs `steps`."""
    import yaml

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cur", "output_dir": str(tmp_path / "runs"),
        "models": {"teacher": str(tiny_model), "student": str(tiny_model)},
        "stages": [
            {"kind": "generate", "name": "teacher", "engine": {"backend": "reference"},
             "input": {"path": str(data), "prompt_field": "question", "reference_field": "answer"}},
            {"kind": "curate", "name": "curate", "input": "teacher", "steps": steps},
        ],
    }))
    return path


@pytest.mark.slow
def test_recipe_runs_generate_then_curate(ray_local, tiny_model, tmp_path, shared_data):
    from raypost.recipe import load_recipe, run_recipe

    problems = gsm8k_questions(shared_data, 12)
    problems.append({"question": problems[0]["question"] + "  ", "answer": problems[0]["answer"]})
    path = generate_then_curate_recipe(tmp_path, tiny_model, problems, [
        {"step": "dedup"}, {"step": "verify"}, {"step": "entropy_route", "model": "student"},
        {"step": "write", "formats": ["sft", "kto"]}])
    summaries = run_recipe(load_recipe(path))
    cur = summaries["curate"]
    assert cur["rejected_by_step"] == {"dedup": 1}       # the first problem twice
    assert cur["steps"]["entropy_route"]["split"] == {"easy": 3, "medium": 6, "hard": 3}
    sft = records.read_rows(tmp_path / "runs" / "curate" / "sft")
    assert len(sft) == 12
    kto = records.read_rows(tmp_path / "runs" / "curate" / "kto")
    assert len(kto) == 12 and all(r["label"] for r in kto)   # the reference engine's answers all verify


def test_a_resumed_curate_stage_pays_no_model_call_twice(ray_local, tiny_model, tmp_path):
    """A curate stage stopped before it finished (its manifest still `running`, as a crash or
    Ctrl-C leaves it) resumes: the student answers generated for selection are kept and read
    back, not generated again; the stage's outputs are written anew."""
    from raypost.recipe import load_recipe, run_recipe

    problems = [{"question": f"What is {i} plus {i}?", "answer": f"#### {2 * i}"} for i in range(4)]
    path = generate_then_curate_recipe(tmp_path, tiny_model, problems, [
        {"step": "select", "scorer": "none", "candidates": [
            {"name": "teacher", "source": "input"},
            {"name": "student", "source": "generate", "model": "student",
             "engine": {"backend": "transformers", "batch_size": 4}, "sampling": {"max_tokens": 4}}]},
        {"step": "write", "formats": ["sft"]}])
    run_recipe(load_recipe(path))
    stage_dir = tmp_path / "runs" / "curate"
    generated = stage_dir / "work" / "candidates_student"
    before = {p.name: p.stat().st_mtime_ns for p in records.part_files(generated)}
    assert before and len(records.read_rows(generated)) == 4
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    (stage_dir / "manifest.json").write_text(json.dumps({**manifest, "state": "running"}))
    again = run_recipe(load_recipe(path))
    assert not again["curate"].get("up_to_date")          # it ran (resumed), it was not skipped
    assert {p.name: p.stat().st_mtime_ns for p in records.part_files(generated)} == before
    assert len(records.read_rows(stage_dir / "sft")) == 4


def test_curate_input_path_is_found_beside_the_recipe(ray_local, tmp_path, monkeypatch):
    import yaml

    from raypost.config import RecipeError

    from raypost.recipe import load_recipe
    from raypost.recipe import run_recipe

    project = tmp_path / "project"
    records.write_part(project / "answers", [prompt_row(f"p-{i}", f"What is {i} + {i}?", reference=f"#### {2 * i}",
                                                        response=f"#### {2 * i}") for i in range(4)])
    recipe = {"name": "c", "output_dir": str(tmp_path / "runs"),
              "stages": [{"kind": "curate", "name": "cur", "input": "answers",
                          "steps": [{"step": "dedup"}, {"step": "verify"}, {"step": "write"}]}]}
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    summaries = run_recipe(load_recipe(project / "recipe.yaml"))
    assert summaries["cur"]["rows_out"] == 4

    # a glob of row files beside the recipe, read by Ray Data; one that matches nothing fails at load
    shards = project / "shards"
    shards.mkdir()
    for i in range(2):
        (shards / f"{i}.jsonl").write_text(json.dumps(prompt_row(f"s-{i}", f"What is {i} + 1?", reference=f"#### {i + 1}",
                                                                 response=f"#### {i + 1}")) + "\n")
    recipe["stages"][0]["input"] = "shards/*.jsonl"
    (project / "glob.yaml").write_text(yaml.safe_dump(recipe))
    assert run_recipe(load_recipe(project / "glob.yaml"))["cur"]["rows_out"] == 2
    # a dataset saved by HF `datasets` (Arrow files beside state.json), named by its directory
    import datasets

    datasets.Dataset.from_list([prompt_row(f"h-{i}", f"What is {i} + 2?", reference=f"#### {i + 2}",
                                           response=f"#### {i + 2}") for i in range(3)]).save_to_disk(str(project / "hf"))
    recipe["stages"][0]["input"] = "hf"
    (project / "hf.yaml").write_text(yaml.safe_dump(recipe))
    curated = run_recipe(load_recipe(project / "hf.yaml"))["cur"]
    assert curated["rows_out"] == 3
    assert sorted(r["id"] for r in records.read_rows(curated["output_dir"])) == ["h-0", "h-1", "h-2"]
    recipe["stages"][0]["input"] = "shards/*.parquet"
    (project / "none.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"shards/\*\.parquet: the pattern matches no file"):
        load_recipe(project / "none.yaml")

    recipe["stages"][0]["input"] = "answer"
    (project / "typo.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"typo.yaml: stages\[0\].input: 'answer' is neither an earlier stage "
                                          r"\(none\) nor a path"):
        run_recipe(load_recipe(project / "typo.yaml"))


def test_example_recipe_validates():
    from raypost.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "examples" / "curate.yaml")
    kinds = [s.kind for s in recipe.stages]
    assert "curate" in kinds
