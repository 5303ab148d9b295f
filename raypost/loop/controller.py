"""The closed loop: score the pool with the current student, spend the teacher budget where it is
weakest, train, evaluate, repeat (arXiv 2512.00884, "Towards Active Synthetic Data Generation").

`LoopController` is an object with a lifecycle (setup / run / close, as torchtune's recipes): the
student and teacher engines are Ray actors that live for the whole loop and the student receives
each round's weights in place. Every phase of a round writes its result under
`<run>/round_<r>/` only when complete, and every teacher request goes through the ledger, so a
driver killed at any point (SIGKILL included) resumes at the phase it was in on rerun and ends
with the ledger totals of an uninterrupted run.

Round 0 is the base student's evaluation (0 teacher tokens). What carries over between rounds:
the weights (each round trains from the last round's model); not the optimizer state (each round
starts a fresh optimizer and schedule over its own steps).

`engines: per_phase` is the baseline that bench/loop.py measures against: each phase that needs
an engine starts its own and stops it at the end, the student starting from the round's weights.
A controller can also be handed engine actors that outlive it (`engines=`), so several loops (the
strategies of a comparison) share one start-up; it then loads its own weights before first use.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from raypost import console
from raypost import records
from raypost.config import RecipeError, SamplingConfig
from raypost.engines.base import Completion, Request
from raypost.errors import StageError
from raypost.loop import checks, faults
from raypost.loop.config import LoopRecipe
from raypost.loop.ledger import Caps, Ledger, paid_entry, request_key
from raypost.loop.strategies import Scored, answer_signals, is_correct, rank, score_items
from raypost.loop.tracking import RoundTracker
from raypost.records import DataError
from raypost.runtime import shared

SETTINGS_FILE = "loop.json"
# what a round's data rows hand to the trainer (SFT conversations or preference pairs)
TRAIN_COLUMNS = ("messages", "prompt", "chosen", "rejected")


def _write_json(path: Path, value: Any) -> None:
    """Atomic: a reader (or a rerun) sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    tmp.replace(path)


def _read_json(path: Path) -> Any | None:
    return json.loads(path.read_text()) if path.exists() else None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def wilson(correct: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion (sound at 0 and 1, unlike the normal one)."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _load_items(path: str, question_field: str, answer_field: str | None, group_by: str | None,
                rejected_to: Path | None) -> list[dict]:
    items, rejected = [], []
    for location, row in records.iter_source_rows(path):
        if isinstance(row, Exception):
            rejected.append({"source": location, "reason": str(row)})
            continue
        question = row.get(question_field)
        if not isinstance(question, str) or not question.strip():
            rejected.append({"source": location, "reason": f"missing or empty field {question_field!r}"})
            continue
        gold = row.get(answer_field) if answer_field else None
        if answer_field and not isinstance(gold, str):
            rejected.append({"source": location, "reason": f"missing field {answer_field!r}"})
            continue
        items.append({"id": str(row.get("id") or location), "question": question, "answer": gold,
                      "group": None if group_by is None or row.get(group_by) is None else str(row[group_by])})
    if rejected and rejected_to is not None:
        _write_jsonl(rejected_to, rejected)
        console.say(f"loop: {len(rejected)} row(s) of {path} set aside in {rejected_to}; first: "
              f"{rejected[0]['source']}: {rejected[0]['reason']}")
    if not items:
        raise DataError(f"{path}: no usable rows ({len(rejected)} rejected)")
    return items


def _load_mbpp_items(path: str, split: str, rejected_to: Path | None) -> list[dict]:
    """MBPP tasks as loop items: the benchmark's prompt (tests shown, code between [BEGIN] and
    [DONE]) and the tests that check an answer in the sandbox."""
    from raypost.evaluation.loaders import load_mbpp, mbpp_split
    from raypost.evaluation.prompts import mbpp_task_text

    loaded = load_mbpp(path)
    if loaded.rejected and rejected_to is not None:
        _write_jsonl(rejected_to, [{"source": r.source, "reason": r.reason} for r in loaded.rejected])
        console.say(f"loop: {len(loaded.rejected)} row(s) of {path} set aside in {rejected_to}; first: "
                    f"{loaded.rejected[0].source}: {loaded.rejected[0].reason}")
    # `answer`: the reference solution, as a reply would mark it (an SFT warm-up's target)
    items = [{"id": item.id, "question": mbpp_task_text(item) + "Write the code between [BEGIN] and [DONE].\n",
              "answer": f"[BEGIN]\n{item.reference.strip()}\n[DONE]" if item.reference.strip() else None,
              "group": None, "kind": "code",
              "tests": {"format": "mbpp", "test_list": item.fields["test_list"],
                        "test_setup_code": item.fields["test_setup_code"], "test_imports": item.fields["test_imports"]}}
             for item in mbpp_split(loaded.items, split)]
    if not items:
        raise DataError(f"{path}: no usable MBPP tasks in split {split!r} ({len(loaded.rejected)} rejected)")
    return items


class LoopController:
    def __init__(self, recipe: LoopRecipe, address: str | None = None, log=console.say, engines: tuple | None = None):
        self.recipe = recipe
        self.config = recipe.loop
        self.run_dir = recipe.resolved_output_dir().resolve()
        self.address = address
        self.log = lambda text: log(text)
        self.student = self.teacher = None
        self.shared_engines = engines   # (student, teacher) actors that outlive this loop
        self.loaded_model: str | None = None
        self.base_model: str | None = None
        self.engine_start_s = 0.0   # every engine start-up of this process, summed
        self.resident = None   # the training actor, where rounds train on one that stays up

    # --- lifecycle ---------------------------------------------------------------------------

    def setup(self) -> None:
        from raypost.models import resolve_model

        self._claim_run_dir()
        budget = self.config.budget
        self.ledger = Ledger(self.run_dir / "ledger.jsonl", budget.price_per_1k_tokens if budget else 0.0)
        self.pool = self._pool()
        self.eval_items = self._eval_items()
        _write_jsonl(self.run_dir / "eval.jsonl", self.eval_items)   # what the workers read to answer it
        self.base_model = str(resolve_model(self.recipe.model("student"), self.recipe.cache_dir))
        self.tracker = RoundTracker(self.config.tracking, self.run_dir, self.recipe.name)
        self.log(f"loop {self.recipe.name}: {len(self.pool)} seeds, {len(self.eval_items)} eval items, "
                 f"strategy {self.strategy_name()}, {len(self.config.shares())} round(s)")

    def _engines(self, model: str | None = None, *, student: bool = True, teacher: bool = True) -> None:
        """Start the engine actors on first use: a rerun of a finished loop starts none. `model`:
        the weights a student that is not up yet starts with (default the base model);
        `student=False` / `teacher=False`: the phase needs only the other one (persistent engines
        start both at first use all the same: they are up for the whole loop)."""
        if self.shared_engines is not None:
            if self.student is None:
                self.student, self.teacher = self.shared_engines
                self.loaded_model = None   # whatever the last loop left in it
            return
        persistent = self.config.engines == "persistent"
        start_student = (student or persistent) and self.student is None
        start_teacher = (teacher or persistent) and self.needs_teacher() and self.teacher is None
        if not (start_student or start_teacher):
            return
        from raypost.loop.engines import start_engine_actor
        from raypost.runtime import ensure_ray

        ensure_ray(self.address)
        started = time.perf_counter()
        if start_student:
            self.loaded_model = model or self.base_model
            self.student = start_engine_actor(self.loaded_model, self.config.student.engine,
                                              self.config.student.resources, self.recipe.cache_dir)
        if start_teacher:
            self._start_teacher()
        elapsed = time.perf_counter() - started
        self.engine_start_s += elapsed
        if self.config.engines == "persistent":
            self.log(f"engines up in {elapsed:.1f} s")

    def _end_phase(self) -> None:
        """With per-phase engines, a phase's engines stop when it ends."""
        if self.config.engines == "per_phase" and self.shared_engines is None:
            self._stop_engines()

    def needs_teacher(self) -> bool:
        return True

    def _start_teacher(self) -> None:
        from raypost.loop.engines import start_engine_actor

        cache = self.recipe.cache_dir
        teacher_engine = self.config.teacher.engine
        if teacher_engine.tokenizer:   # a name from `models`, like a stage's
            teacher_engine = teacher_engine.model_copy(
                update={"tokenizer": self.recipe.models.lookup(teacher_engine.tokenizer)})
        # the teacher counts a prompt's tokens before it is sent (the budget check): with its own
        # tokenizer, or the student's where it has none (an endpoint, the simulator)
        self.teacher = start_engine_actor(self.recipe.model("teacher"), teacher_engine,
                                          self.config.teacher.resources, cache, tokenizer_of=self.base_model)

    def resident_trainer(self):
        """The loop's training actor (started at the first fit), or None: each fit is a Ray Train run."""
        if not self.config.resident_trainer():
            return None
        if self.resident is None:
            from raypost.training.resident import ResidentTrainer

            self.resident = ResidentTrainer(self.config.train, log=self.log)
        return self.resident

    def close(self) -> None:
        if self.resident is not None:
            self.resident.close()
            self.resident = None
        self._stop_engines()

    def _stop_engines(self) -> None:
        from raypost.loop.engines import stop_engine_actor

        if self.shared_engines is not None:   # they belong to whoever started them
            self.student = self.teacher = None
            return
        for actor in (self.student, self.teacher):
            if actor is not None:
                stop_engine_actor(actor)
        self.student = self.teacher = None

    def __enter__(self) -> "LoopController":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        tracker = getattr(self, "tracker", None)
        if tracker is not None:
            tracker.close()

    def _claim_run_dir(self) -> None:
        """A run directory holds one loop: rerunning it resumes; other settings are refused, since
        its ledger and data belong to the first."""
        # how engines live and where records are tracked change no result: a rerun may change them
        settings = self.recipe.loop.model_dump(mode="json", exclude={"engines", "tracking"})
        settings["student_model"] = self.recipe.model("student")
        settings["teacher_model"] = self.recipe.model("teacher")
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        path = self.run_dir / SETTINGS_FILE
        saved = _read_json(path)
        if saved is not None and saved["digest"] != digest:
            changed = sorted(k for k in set(saved["settings"]) | set(settings)
                             if saved["settings"].get(k) != settings.get(k))
            raise RecipeError(f"{self.run_dir}: holds a loop with other settings (changed: {', '.join(changed)}); "
                              "its ledger belongs to that loop: choose another output_dir, or delete it")
        if saved is None:
            _write_json(path, {"digest": digest, "settings": settings})

    def _pool(self) -> list[dict]:
        return self._load_pool(self.config.pool, self.run_dir / "pool.jsonl", "pool")

    def _load_pool(self, pool, path: Path, name: str, exclude_also: set[str] = frozenset()) -> list[dict]:
        """A pool's rows, stored in the run dir the first time (a rerun reads the same rows).
        Synthesized questions never repeat an eval question, nor one of `exclude_also`."""
        if not path.exists():
            if pool.synth is not None:
                from raypost.tasks import arith

                exclude = set(arith.read_questions(self.config.eval.path)) | set(exclude_also)
                items = arith.synthesize(pool.synth.n, arith.parse_levels(pool.synth.levels), pool.synth.seed,
                                         distractors=pool.synth.distractors, exclude=exclude,
                                         id_prefix=f"seed{pool.synth.seed}")
                rows = [{"id": i.id, "question": i.question, "answer": i.answer, "group": str(i.level)} for i in items]
            elif pool.format == "mbpp":
                rows = _load_mbpp_items(pool.path, pool.split, self.run_dir / "rejected" / f"{name}.jsonl")
            else:
                rows = _load_items(pool.path, pool.question_field, pool.answer_field, pool.group_by,
                                   self.run_dir / "rejected" / f"{name}.jsonl")
            _write_jsonl(path, rows)
        return _read_jsonl(path)

    def _eval_items(self) -> list[dict]:
        spec = self.config.eval
        if spec.format == "mbpp":
            items = _load_mbpp_items(spec.path, spec.split, self.run_dir / "rejected" / "eval.jsonl")
        else:
            items = _load_items(spec.path, "question", "answer", spec.group_by, self.run_dir / "rejected" / "eval.jsonl")
        if spec.limit:
            taken: dict[Any, int] = {}
            kept = []
            for item in items:
                if taken.get(item["group"], 0) < spec.limit:
                    taken[item["group"]] = taken.get(item["group"], 0) + 1
                    kept.append(item)
            items = kept
        return items

    def _messages(self, question: str) -> list[dict[str, str]]:
        system = self.config.pool.system_prompt
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> list[dict]:
        from raypost.loop.report import write_report

        started = time.perf_counter()
        self._baseline()
        for round_index in range(1, len(self.config.shares()) + 1):
            self.run_round(round_index)
        records_ = self.round_records()
        write_report(self.run_dir, records_, self.recipe)
        total = self.ledger.totals()
        last = records_[-1]
        self.log(f"loop {self.recipe.name}: accuracy {records_[0]['accuracy']:.3f} -> {last['accuracy']:.3f} "
                 f"[{last['accuracy_ci95'][0]:.3f}, {last['accuracy_ci95'][1]:.3f}] with {total.requests} teacher "
                 f"requests, {total.tokens} tokens; report in {self.run_dir / 'report'} "
                 f"({time.perf_counter() - started:.0f} s)")
        return records_

    def round_dir(self, round_index: int) -> Path:
        return self.run_dir / f"round_{round_index}"

    def round_records(self) -> list[dict]:
        found = []
        for r in range(0, len(self.config.shares()) + 1):
            record = _read_json(self.round_dir(r) / "record.json")
            if record is not None:
                found.append(record)
        _write_jsonl(self.run_dir / "rounds.jsonl", found)
        return found

    def _baseline(self) -> None:
        directory = self.round_dir(0)
        if (directory / "record.json").exists():
            return
        model = self.model_after(0)
        starts = self.engine_start_s
        evaluation = self._evaluate(0, model)
        self._end_phase()
        record = {"round": 0, "strategy": self.strategy_name(), "model": model,
                  **self._accuracy_fields(evaluation), "teacher_round": self.ledger.totals(0).as_dict(),
                  "teacher_total": {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "tokens": 0,
                                    "cost_usd": 0.0},
                  "seconds": {"eval": evaluation["seconds"], "engine_start": self.engine_start_s - starts}}
        _write_json(directory / "record.json", record)
        self.tracker.log(record)
        self.log(f"round 0 ({'base student' if model == self.base_model else 'warm-up'}): accuracy {record['accuracy']:.3f} "
                 f"[{record['accuracy_ci95'][0]:.3f}, {record['accuracy_ci95'][1]:.3f}]")

    def strategy_name(self) -> str:
        return self.config.selection.strategy

    def run_round(self, round_index: int) -> dict:
        directory = self.round_dir(round_index)
        record = _read_json(directory / "record.json")
        if record is not None:
            self.log(f"round {round_index}: done before (accuracy {record['accuracy']:.3f})")
            return record
        started, starts = time.perf_counter(), self.engine_start_s
        previous = self.model_after(round_index - 1)
        scores = self._score(round_index, previous)
        self._end_phase()
        teacher = self._ask_teacher(round_index, scores)
        self._end_phase()
        trained = self._train(round_index, previous)
        evaluation = self._evaluate(round_index, trained["model"])
        self._end_phase()
        totals = self.ledger.totals()
        syncs = [s for s in (scores.get("sync"), evaluation.get("sync")) if s]
        record = {
            "round": round_index, "strategy": self.config.selection.strategy, "model": trained["model"],
            **self._accuracy_fields(evaluation),
            "pool_accuracy": scores.get("pool_accuracy"), "unlearnable": scores.get("unlearnable"),
            "teacher_round": self.ledger.totals(round_index).as_dict(), "teacher_total": totals.as_dict(),
            "judge_round": self.ledger.totals(round_index, kinds=("judge",)).as_dict(),
            "kept": teacher["kept"], "rejected": teacher["rejected"], "train_rows": trained["rows"],
            "train_steps": trained["steps"], "train_loss": trained.get("loss"), "trainer": trained.get("trainer"),
            "weight_sync": evaluation.get("sync"),
            "selected_groups": teacher["selected_groups"],
            "seconds": {"score": scores["seconds"], "teacher": teacher["seconds"], "train": trained["seconds"],
                        "train_compute": trained.get("train_runtime_s", 0.0),
                        "weight_sync": sum(s["seconds"] for s in syncs),
                        "eval": evaluation["seconds"],
                        # engine start-ups in this process during the round (0 on a resume that found them up)
                        "engine_start": self.engine_start_s - starts,
                        "round": time.perf_counter() - started},
        }
        _write_json(directory / "record.json", record)
        self.tracker.log(record)
        self.log(f"round {round_index}: accuracy {record['accuracy']:.3f} [{record['accuracy_ci95'][0]:.3f}, "
                 f"{record['accuracy_ci95'][1]:.3f}]; teacher {record['teacher_round']['requests']} requests "
                 f"({totals.requests} in all), {record['teacher_round']['tokens']} tokens ({totals.tokens} in all); "
                 f"kept {teacher['kept']}, rejected {teacher['rejected']}; trained {trained['steps']} steps on "
                 f"{trained['rows']} rows")
        return record

    def model_after(self, round_index: int) -> str:
        """The student after round r: the last round that trained (round 0: a warm-up), else the
        base model."""
        for r in range(round_index, -1, -1):
            result = _read_json(self.round_dir(r) / "train.json")
            if result is not None and result.get("model"):
                return result["model"]
        return self.base_model

    def _use_student(self, model: str) -> dict | None:
        import ray

        self._engines(model, teacher=False)
        if self.loaded_model == model:
            return None
        sync = ray.get(self.student.load_weights.remote(model))
        self.loaded_model = model
        return sync

    def _answer(self, actor, items: list[dict], messages, sampling: SamplingConfig) -> list[list[Completion] | str]:
        import ray

        requests = [Request(id=item["id"], messages=messages(item), reference=item.get("answer")) for item in items]
        return ray.get(actor.generate.remote(requests, sampling))

    def _student_answers(self, source: Path, output: Path, model: str, sampling: SamplingConfig,
                         light, **kwargs) -> list[dict]:
        """The running student answers the loop items of `source` (a JSONL in the run dir) through
        the generation stage, like any teacher run: Ray Data reads the file on the workers, every
        batch is committed as a Parquet part under `output` (a round killed mid-phase resumes from
        what is committed), and `light`, a map over the parts, sends the driver a few values per
        answer: the answers and their logprobs stay where they were read."""
        import ray

        from raypost.generation.pipeline import generate_files

        fmt = records.PromptFormat(prompt_field="question", id_field="id", reference_field="answer",
                                   system_prompt=self.config.pool.system_prompt)
        generate_files(str(source), fmt, model=model, output_dir=output, engine=self.config.student.engine,
                       sampling=sampling, cache_dir=self.recipe.cache_dir, progress=False,
                       engine_actor=lambda _: self.student)
        parts = [str(p) for p in records.part_files(output)]
        if not parts:
            return []
        return ray.data.read_parquet(parts).map_batches(light, batch_format="pyarrow", fn_kwargs=kwargs).take_all()

    def _pool_answers(self, round_index: int, model: str, sampling: SamplingConfig, keep_text: bool) -> dict[str, dict]:
        """(id, correct, signal) per seed, from the student's answers under round_N/answers."""
        rows = self._student_answers(self.run_dir / "pool.jsonl", self.round_dir(round_index) / "answers", model,
                                     sampling, answer_signals, strategy=self.config.selection.strategy,
                                     reduce=self.config.selection.reduce, keep_text=keep_text)
        return {row["id"]: row for row in rows}

    # --- phases ------------------------------------------------------------------------------

    def _score(self, round_index: int, model: str) -> dict:
        path = self.round_dir(round_index) / "scores.json"
        done = _read_json(path)
        if done is not None:
            return done
        import ray

        started, starts = time.perf_counter(), self.engine_start_s
        selection = self.config.selection
        strategy = selection.strategy
        needs_answers = strategy not in ("random", "static", "kcenter") or selection.skip_solved
        sync = None
        if needs_answers or selection.learnability:
            sync = self._use_student(model)
        if needs_answers:
            sampling = self.config.student.sampling.model_copy(update={
                "temperature": 0.0, "n": 1, "logprobs": selection.logprobs,
                "first_token_entropy": strategy == "first_token_entropy"})
            answers = self._pool_answers(round_index, model, sampling, keep_text=strategy == "judge")
        else:
            answers = {}
        scored = []
        for item in self.pool:
            answer = answers.get(item["id"])
            if answer is None:   # not asked, or the student could not answer (a rejected row)
                correct = is_correct("", item["answer"]) if needs_answers else None
                scored.append(Scored(item["id"], item["group"], None, correct))
            else:
                scored.append(Scored(item["id"], item["group"], Completion(answer["text"] or "", 0, 0),
                                     answer["correct"], signal=answer["signal"]))
        if strategy == "loss_gold":
            losses = ray.get(self.student.answer_losses.remote(
                [Request(id=i["id"], messages=self._messages(i["question"])) for i in self.pool],
                [i["answer"] for i in self.pool]))
            for item, loss in zip(scored, losses):
                item.gold_loss = tuple(loss)
        if strategy == "judge":
            self._judge(round_index, scored)
        if selection.learnability:
            self._learnability(round_index, model, scored)
        embeddings = self._pool_embeddings() if strategy == "kcenter" else None
        seed = self.config.seed * 1000 + round_index
        values = score_items(scored, strategy, selection.reduce, seed=seed, embeddings=embeddings,
                             taught=self._taught_before(round_index) if strategy == "kcenter" else ())
        order = rank(scored, values, skip_solved=selection.skip_solved, quota_by_group=selection.quota_by is not None,
                     proportional=selection.proportional, seed=seed)
        faults.maybe_kill(self.run_dir, "score", round_index)
        judged = [s.correct for s in scored if s.correct is not None]
        result = {"order": [self.pool[i]["id"] for i in order],
                  "scores": {s.id: v for s, v in zip(scored, values)},
                  "pool_accuracy": sum(judged) / len(judged) if judged else None,
                  "unlearnable": sum(1 for s in scored if not s.learnable) if selection.learnability else None,
                  "sync": sync,
                  "seconds": time.perf_counter() - started - (self.engine_start_s - starts)
                             - (sync or {}).get("seconds", 0.0)}
        _write_json(path, result)
        return result

    def _judge(self, round_index: int, scored: list[Scored]) -> None:
        """The teacher grades each of the student's answers (1-10). Every grade is a ledger entry
        (kind judge, outside the budget caps), so a rerun pays no grade twice."""
        from raypost.engines.judge import judge_messages, parse_grade

        self._engines(student=False)
        sampling = SamplingConfig(temperature=0.0, max_tokens=8)
        missing = []
        for item, score in zip(self.pool, scored):
            if score.completion is None:
                continue   # the student could not answer: nothing to grade, ranked after the graded
            key = request_key(self.recipe.name, round_index, item["id"], kind="judge")
            if key not in self.ledger:
                missing.append((key, item, score))
        batch_size = max(1, self.config.teacher.engine.batch_size)
        for start in range(0, len(missing), batch_size):
            self._pay(round_index, [(Request(id=key, messages=judge_messages(item["question"], score.completion.text)),
                                     item["id"]) for key, item, score in missing[start:start + batch_size]],
                      sampling, kind="judge")
        for item, score in zip(self.pool, scored):
            entry = self.ledger.get(request_key(self.recipe.name, round_index, item["id"], kind="judge"))
            if entry is not None and "error" not in entry:
                score.grade = parse_grade(entry["texts"][0])

    def _pay(self, round_index: int, batch: list[tuple[Request, str]], sampling: SamplingConfig,
             kind: str = "answer") -> None:
        """One batch of teacher requests (each keyed by its Request id, for a seed id): every answer
        is in the ledger, fsynced, before anything reads it. A batch whose every request failed is
        a teacher outage: the loop stops, paying nothing for it, and a rerun continues."""
        import ray

        answers = ray.get(self.teacher.generate.remote([request for request, _ in batch], sampling))
        if all(isinstance(a, str) for a in answers):
            raise StageError(f"teacher {self.recipe.model('teacher')}: every {'' if kind == 'answer' else kind + ' '}"
                             f"request of a batch failed ({answers[0]}); the ledger keeps what was paid; rerun to continue")
        self.ledger.record([paid_entry(request.id, round_index, seed_id, answer, kind=kind)
                            for (request, seed_id), answer in zip(batch, answers)])

    def _learnability(self, round_index: int, model: str, scored: list[Scored]) -> None:
        """The student samples each seed a few times; `skip` decides which verdicts make it wait."""
        config = self.config.selection.learnability
        sampling = self.config.student.sampling.model_copy(update={
            "temperature": config.temperature, "n": config.samples, "logprobs": None,
            "seed": self.config.seed * 1000 + round_index})
        answers = self._student_answers(self.run_dir / "pool.jsonl", self.round_dir(round_index) / "learnability",
                                        model, sampling, answer_signals, strategy="none",
                                        reduce="mean", keep_text=False)
        samples, solved = Counter(a["id"] for a in answers), Counter(a["id"] for a in answers if a["correct"])
        for item, score in zip(self.pool, scored):
            if not samples[item["id"]]:   # the student could not answer it (a rejected row)
                continue
            too_easy = solved[item["id"]] == samples[item["id"]] and config.skip in ("both", "solved")
            too_hard = solved[item["id"]] == 0 and config.skip in ("both", "unsolved")
            score.learnable = not (too_easy or too_hard)

    def _pool_embeddings(self):
        """The pool's question embeddings, computed once per loop (in a Ray task) and kept."""
        import numpy as np
        import ray

        from raypost.loop.strategies import embed_questions
        from raypost.runtime import ensure_ray

        path = self.run_dir / f"pool_embeddings_{self.config.selection.embedder}.npy"
        if not path.exists():
            ensure_ray(self.address)
            task = ray.remote(num_cpus=0.5)(embed_questions)
            vectors = ray.get(task.remote([i["question"] for i in self.pool], self.config.selection.embedder))
            tmp = path.with_name(path.stem + ".tmp.npy")
            np.save(tmp, vectors)
            tmp.replace(path)
        return np.load(path)

    def _taught_before(self, round_index: int) -> list[int]:
        """Indices of the pool seeds the teacher was asked about in earlier rounds."""
        position = {item["id"]: i for i, item in enumerate(self.pool)}
        seeds = {e["seed_id"] for e in self.ledger.entries.values()
                 if e["round"] < round_index and e.get("kind", "answer") == "answer"}
        return sorted(position[s] for s in seeds if s in position)

    def _caps(self, round_index: int) -> Caps:
        share = sum(self.config.shares()[:round_index])
        budget = self.config.budget
        if budget is None:
            return Caps()
        # floor + epsilon: shares of 1/3 must add up to the whole budget, not one request short
        return Caps(requests=math.floor(budget.requests * share + 1e-9) if budget.requests else float("inf"),
                    tokens=math.floor(budget.tokens * share + 1e-9) if budget.tokens else float("inf"),
                    cost_usd=budget.cost_usd * share if budget.cost_usd else float("inf"))

    def _teacher_request(self, item: dict) -> list[dict[str, str]]:
        if self.config.teacher.mode == "rewrite":
            from raypost.tasks import arith

            return [{"role": "user", "content": arith.rewrite_prompt(item["question"])}]
        return self._messages(item["question"])

    def _ask_teacher(self, round_index: int, scores: dict) -> dict:
        import ray

        directory = self.round_dir(round_index)
        done = _read_json(directory / "teacher.json")
        if done is not None:
            return done
        started, starts = time.perf_counter(), self.engine_start_s
        config = self.config.teacher
        sampling = config.sampling.model_copy(update={"seed": (config.sampling.seed or 0) + round_index})
        caps = self._caps(round_index)
        by_id = {item["id"]: item for item in self.pool}
        batch_size = config.engine.batch_size
        batches = 0
        stopped = None
        order = [by_id[i] for i in scores["order"]]
        position = 0
        question_overhead = None   # a vote's prompt tokens besides its question (template, system prompt)
        while position < len(order) and stopped is None:
            batch: list[tuple[str, dict, int]] = []
            self._engines(student=False)
            if config.vote is not None:   # settle what is owed first: the votes of problems already written
                batches = self._votes(round_index, caps, batches)
            spent = self.ledger.totals()
            if question_overhead is None:
                question_overhead = ray.get(self.teacher.count_tokens.remote(self._messages(""))) if config.vote else 0
            while position < len(order) and len(batch) < batch_size:
                item = order[position]
                key = request_key(self.recipe.name, round_index, item["id"])
                if key in self.ledger:
                    position += 1
                    continue
                prompt_tokens = ray.get(self.teacher.count_tokens.remote(self._teacher_request(item)))
                # a written problem's vote is reserved with it, so it is never left unaffordable
                worst = config.worst_tokens(prompt_tokens, question_overhead)
                if not self.ledger.affords(caps, worst, [w for _, _, w in batch], spent, config.requests_per_seed):
                    stopped = "budget"
                    break
                batch.append((key, item, worst))
                position += 1
            if not batch:
                break
            self._pay(round_index, [(Request(id=key, messages=self._teacher_request(item), reference=item.get("answer")),
                                     item["id"]) for key, item, _ in batch], sampling)
            batches += 1
            faults.maybe_kill(self.run_dir, "teacher", round_index, batches)
        if config.vote is not None:
            self._engines(student=False)
            batches = self._votes(round_index, caps, batches)
        kept, rejected, groups = self._build_data(round_index, by_id)
        result = {"kept": len(kept), "rejected": len(rejected), "stopped_by": stopped or "seeds",
                  "selected_groups": groups,
                  "seconds": time.perf_counter() - started - (self.engine_start_s - starts)}
        _write_jsonl(directory / "data.jsonl", kept)
        _write_jsonl(directory / "rejected.jsonl", rejected)
        _write_json(directory / "teacher.json", result)
        return result

    def _votes(self, round_index: int, caps: Caps, batches: int) -> int:
        """The teacher answers each problem it wrote this round `vote.samples` times (one ledger
        entry, kind vote, per written problem). Returns the teacher batches sent so far."""
        import ray

        from raypost.tasks import arith

        config = self.config.teacher
        vote = config.vote
        sampling = config.sampling.model_copy(update={"n": vote.samples, "temperature": vote.temperature,
                                                      "seed": (config.sampling.seed or 0) + round_index})
        missing = []
        for entry in list(self.ledger.entries.values()):
            if entry["round"] != round_index or entry.get("kind", "answer") != "answer" or "error" in entry:
                continue
            for k, text in enumerate(entry["texts"]):
                written = arith.written_problem(text)
                key = f"{entry['key']}/vote{k}"
                if written is not None and key not in self.ledger:
                    missing.append((key, entry["seed_id"], written[0]))
        batch_size = max(1, config.engine.batch_size)
        for start in range(0, len(missing), batch_size):
            spent, batch = self.ledger.totals(), []
            for key, seed_id, question in missing[start:start + batch_size]:
                messages = self._messages(question)
                worst = ray.get(self.teacher.count_tokens.remote(messages)) + sampling.max_tokens * sampling.n
                if self.ledger.affords(caps, worst, [w for *_, w in batch], spent):   # reserved: always, unless
                    batch.append((key, seed_id, messages, worst))                    # a count ran over its bound
            if not batch:
                continue
            self._pay(round_index, [(Request(id=key, messages=messages), seed_id) for key, seed_id, messages, _ in batch],
                      sampling, kind="vote")
            batches += 1
            faults.maybe_kill(self.run_dir, "teacher", round_index, batches)
        return batches

    def _build_data(self, round_index: int, by_id: dict[str, dict]) -> tuple[list[dict], list[dict], dict]:
        """SFT rows from this round's paid answers, each checked: a written problem must be one the
        family's solver reads and agrees with (or, with `teacher.vote`, one whose answers by the
        teacher agree with its solution); an answer must match the seed's gold answer."""
        from raypost.tasks import arith

        vote = self.config.teacher.vote
        kept, rejected, groups = [], [], {}
        for entry in self.ledger.entries.values():
            if entry["round"] != round_index or entry.get("kind", "answer") != "answer":
                continue
            seed = by_id[entry["seed_id"]]
            groups[str(seed["group"])] = groups.get(str(seed["group"]), 0) + 1
            if "error" in entry:
                rejected.append({"key": entry["key"], "reason": entry["error"]})
                continue
            for k, text in enumerate(entry["texts"]):
                if self.config.teacher.mode == "rewrite":
                    written = arith.written_problem(text)
                    if written is None:
                        rejected.append({"key": entry["key"], "sample": k, "reason": "no 'Problem:/Solution:' "
                                         "with a final '#### N'"})
                        continue
                    question, solution = written
                    reason = self._vote_verdict(entry, k, solution) if vote else self._solver_verdict(question, solution)
                    if reason is not None:
                        rejected.append({"key": entry["key"], "sample": k, "reason": reason})
                        continue
                else:
                    question, solution = seed["question"], text
                    if seed["answer"] is not None and not is_correct(solution, seed["answer"]):
                        rejected.append({"key": entry["key"], "sample": k, "reason": "wrong answer"})
                        continue
                kept.append({"id": f"{entry['key']}/{k}", "seed_id": seed["id"], "group": seed["group"],
                             "messages": [*self._messages(question), {"role": "assistant", "content": solution}]})
        return kept, rejected, groups

    @staticmethod
    def _solver_verdict(question: str, solution: str) -> str | None:
        """Why the task's own solver rejects a written problem, or None when it agrees."""
        from raypost.tasks import arith

        try:
            exact = arith.solve(arith.parse_problem(question)).text
        except arith.ParseError as error:
            return f"unreadable problem: {error}"
        return None if is_correct(solution, exact) else "wrong solution"

    def _vote_verdict(self, entry: dict, sample: int, solution: str) -> str | None:
        """Why the teacher's vote rejects a written problem, or None when enough answers agree."""
        vote = self.config.teacher.vote
        votes = self.ledger.get(f"{entry['key']}/vote{sample}")
        if votes is None:
            return "no vote: the budget ran out first"
        if "error" in votes:
            return f"vote failed: {votes['error']}"
        agree = sum(bool(is_correct(text, solution)) for text in votes["texts"])
        return None if agree >= vote.min_agree else f"vote: {agree} of {len(votes['texts'])} answers agree"

    def _train(self, round_index: int, previous: str) -> dict:
        from raypost.training.train import train

        directory = self.round_dir(round_index)
        done = _read_json(directory / "train.json")
        if done is not None:
            return done
        started = time.perf_counter()
        rounds = range(1, round_index + 1) if self.config.train_on == "all" else [round_index]
        rows = [row for r in rounds for row in _read_jsonl(self.round_dir(r) / "data.jsonl")]
        if not rows:
            result = {"model": previous, "rows": 0, "steps": 0, "seconds": time.perf_counter() - started,
                      "note": "no data: the student is unchanged"}
            _write_json(directory / "train.json", result)
            return result
        data = directory / "train_data.jsonl"
        _write_jsonl(data, [{k: r[k] for k in TRAIN_COLUMNS if k in r} for r in rows])
        config = self.config.train
        if self.config.selection.strategy == "static":
            block = config.block
            if block.max_steps > 0:   # equal compute: the static baseline trains as many steps as all rounds
                config = config.model_copy(update={config.method: block.model_copy(
                    update={"max_steps": block.max_steps * self.config.rounds})})
        callback = faults.training_callback(self.run_dir, round_index)
        outcome = train(config, model=previous, dataset=data, output_dir=directory / "train", resume=True,
                        cache_dir=self.recipe.cache_dir, callbacks=[callback] if callback else None,
                        resident=self.resident_trainer())
        losses = [h["loss"] for h in outcome.history if "loss" in h]
        result = {"model": outcome.model_dir, "rows": len(rows), "steps": outcome.steps,
                  "loss": losses[-1] if losses else None, "seconds": time.perf_counter() - started,
                  "train_runtime_s": outcome.metrics.get("train_runtime_s", 0.0), "trainer": outcome.trainer}
        _write_json(directory / "train.json", result)
        return result

    def _evaluate(self, round_index: int, model: str) -> dict:
        path = self.round_dir(round_index) / "eval.json"
        done = _read_json(path)
        if done is not None:
            return done
        started, starts = time.perf_counter(), self.engine_start_s
        sync = self._use_student(model)
        sampling = self.config.student.sampling.model_copy(update={
            "temperature": 0.0, "n": 1, "max_tokens": self.config.eval.max_tokens, "logprobs": None})
        output = self.round_dir(round_index) / "eval_answers"
        verdicts = {v["id"]: v["correct"] for v in self._student_answers(
            self.run_dir / "eval.jsonl", output, model, sampling, checks.verdicts,
            items=shared({item["id"]: item for item in self.eval_items}))}
        faults.maybe_kill(self.run_dir, "eval", round_index)
        failed = {r["id"]: r["reason"] for r in records.read_rows(output / "rejected")}
        per_item = [{"id": item["id"], "group": item["group"], "correct": bool(verdicts.get(item["id"], False)),
                     "error": None if item["id"] in verdicts else failed.get(item["id"], "no answer")}
                    for item in self.eval_items]
        _write_jsonl(self.round_dir(round_index) / "eval_items.jsonl", per_item)
        result = {"items": len(per_item), "correct": sum(i["correct"] for i in per_item), "groups": {},
                  "failed": sum(1 for i in per_item if i["error"]), "sync": sync,
                  # a start-up or a weight sync is not eval time
                  "seconds": time.perf_counter() - started - (self.engine_start_s - starts)
                             - (sync or {}).get("seconds", 0.0)}
        for item in per_item:
            group = result["groups"].setdefault(str(item["group"]), {"items": 0, "correct": 0})
            group["items"] += 1
            group["correct"] += item["correct"]
        _write_json(path, result)
        return result

    @staticmethod
    def _accuracy_fields(evaluation: dict) -> dict:
        n, c = evaluation["items"], evaluation["correct"]
        return {"accuracy": c / n if n else 0.0, "accuracy_ci95": wilson(c, n), "eval_items": n,
                "per_group": {g: {"accuracy": v["correct"] / v["items"], "ci95": wilson(v["correct"], v["items"]),
                                  "items": v["items"]} for g, v in sorted(evaluation["groups"].items())}}


def run_loop(recipe: LoopRecipe, address: str | None = None) -> list[dict]:
    """Run (or resume) a loop to the end; the round records, round 0 (the base student) first."""
    controller_class = LoopController
    if recipe.loop.mode == "sipf":
        from raypost.loop.sipf import SipfController

        controller_class = SipfController
    with controller_class(recipe, address) as controller:
        return controller.run()
