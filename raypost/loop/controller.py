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
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from raypost import console
from raypost import records
from raypost.config import RecipeError, SamplingConfig
from raypost.engines.base import Completion, Request
from raypost.errors import StageError
from raypost.loop import faults
from raypost.loop.config import LoopRecipe
from raypost.loop.ledger import Caps, Ledger, paid_entry, request_key
from raypost.loop.strategies import Scored, rank, score_items
from raypost.records import DataError

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


def _is_correct(text: str, gold: str | None) -> bool | None:
    from raypost.evaluation.scoring import score_gsm8k

    return None if gold is None else score_gsm8k(text, gold).correct


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


class LoopController:
    def __init__(self, recipe: LoopRecipe, address: str | None = None, log=console.say):
        self.recipe = recipe
        self.config = recipe.loop
        self.run_dir = recipe.resolved_output_dir().resolve()
        self.address = address
        self.log = lambda text: log(text)
        self.student = self.teacher = None
        self.loaded_model: str | None = None
        self.base_model: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def setup(self) -> None:
        from raypost.models import resolve_model

        self._claim_run_dir()
        budget = self.config.budget
        self.ledger = Ledger(self.run_dir / "ledger.jsonl", budget.price_per_1k_tokens if budget else 0.0)
        self.pool = self._pool()
        self.eval_items = self._eval_items()
        self.base_model = str(resolve_model(self.recipe.model("student"), self.recipe.cache_dir))
        self.engine_start_s = 0.0
        self.log(f"loop {self.recipe.name}: {len(self.pool)} seeds, {len(self.eval_items)} eval items, "
                 f"strategy {self.strategy_name()}, {len(self.config.shares())} round(s)")

    def _engines(self) -> None:
        """Start the engine actors on first use: a rerun of a finished loop starts none."""
        if self.student is not None:
            return
        from raypost.loop.engines import start_engine_actor
        from raypost.runtime import ensure_ray

        ensure_ray(self.address)
        cache = self.recipe.cache_dir
        started = time.perf_counter()
        self.student = start_engine_actor(self.base_model, self.config.student.engine,
                                          self.config.student.resources, cache)
        self.loaded_model = self.base_model
        if self.needs_teacher():
            self._start_teacher()
        self.engine_start_s = time.perf_counter() - started
        self.log(f"engines up in {self.engine_start_s:.1f} s")

    def needs_teacher(self) -> bool:
        return True

    def _start_teacher(self) -> None:
        from raypost.loop.engines import start_engine_actor

        cache = self.recipe.cache_dir
        teacher_engine = self.config.teacher.engine
        if teacher_engine.tokenizer:   # a name from `models`, like a stage's
            teacher_engine = teacher_engine.model_copy(
                update={"tokenizer": self.recipe.models.lookup(teacher_engine.tokenizer)})
        self.teacher = start_engine_actor(self.recipe.model("teacher"), teacher_engine,
                                          self.config.teacher.resources, cache)

    def close(self) -> None:
        import ray

        for actor in (self.student, self.teacher):
            if actor is not None:
                try:
                    ray.get(actor.close.remote(), timeout=60)
                except Exception:   # noqa: BLE001 - closing is best effort; the kill below is not
                    pass
                ray.kill(actor)
        self.student = self.teacher = None

    def __enter__(self) -> "LoopController":
        self.setup()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _claim_run_dir(self) -> None:
        """A run directory holds one loop: rerunning it resumes; other settings are refused, since
        its ledger and data belong to the first."""
        settings = self.recipe.loop.model_dump(mode="json")
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
            else:
                rows = _load_items(pool.path, pool.question_field, pool.answer_field, pool.group_by,
                                   self.run_dir / "rejected" / f"{name}.jsonl")
            _write_jsonl(path, rows)
        return _read_jsonl(path)

    def _eval_items(self) -> list[dict]:
        spec = self.config.eval
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
        evaluation = self._evaluate(0, model)
        record = {"round": 0, "strategy": self.strategy_name(), "model": model,
                  **self._accuracy_fields(evaluation), "teacher_round": self.ledger.totals(0).as_dict(),
                  "teacher_total": {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "tokens": 0,
                                    "cost_usd": 0.0},
                  "seconds": {"eval": evaluation["seconds"], "engine_start": self.engine_start_s}}
        _write_json(directory / "record.json", record)
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
        previous = self.model_after(round_index - 1)
        scores = self._score(round_index, previous)
        teacher = self._ask_teacher(round_index, scores)
        trained = self._train(round_index, previous)
        evaluation = self._evaluate(round_index, trained["model"])
        totals = self.ledger.totals()
        record = {
            "round": round_index, "strategy": self.config.selection.strategy, "model": trained["model"],
            **self._accuracy_fields(evaluation),
            "pool_accuracy": scores.get("pool_accuracy"),
            "teacher_round": self.ledger.totals(round_index).as_dict(), "teacher_total": totals.as_dict(),
            "kept": teacher["kept"], "rejected": teacher["rejected"], "train_rows": trained["rows"],
            "train_steps": trained["steps"], "train_loss": trained.get("loss"),
            "weight_sync": evaluation.get("sync"),
            "selected_groups": teacher["selected_groups"],
            "seconds": {"score": scores["seconds"], "teacher": teacher["seconds"], "train": trained["seconds"],
                        "weight_sync": (evaluation.get("sync") or {}).get("seconds", 0.0),
                        "eval": evaluation["seconds"]},
        }
        _write_json(directory / "record.json", record)
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

        self._engines()
        if self.loaded_model == model:
            return None
        sync = ray.get(self.student.load_weights.remote(model))
        self.loaded_model = model
        return sync

    def _answer(self, actor, items: list[dict], messages, sampling: SamplingConfig) -> list[list[Completion] | str]:
        import ray

        self._engines()
        requests = [Request(id=item["id"], messages=messages(item), reference=item.get("answer")) for item in items]
        return ray.get(actor.generate.remote(requests, sampling))

    # --- phases ------------------------------------------------------------------------------

    def _score(self, round_index: int, model: str) -> dict:
        path = self.round_dir(round_index) / "scores.json"
        done = _read_json(path)
        if done is not None:
            return done
        import ray

        self._engines()
        started = time.perf_counter()
        selection = self.config.selection
        strategy = selection.strategy
        needs_answers = strategy not in ("random", "static") or selection.skip_solved
        if needs_answers:
            self._use_student(model)
            sampling = self.config.student.sampling.model_copy(update={
                "temperature": 0.0, "n": 1, "logprobs": selection.logprobs,
                "first_token_entropy": strategy == "first_token_entropy"})
            answers = self._answer(self.student, self.pool, lambda i: self._messages(i["question"]), sampling)
        else:
            answers = [[Completion(text="", completion_tokens=0, prompt_tokens=0)] for _ in self.pool]
        scored = []
        for item, answer in zip(self.pool, answers):
            completion = answer[0] if isinstance(answer, list) else Completion("", 0, 0)
            correct = _is_correct(completion.text, item["answer"]) if needs_answers else None
            scored.append(Scored(item["id"], item["group"], completion, correct))
        if strategy == "loss_gold":
            losses = ray.get(self.student.answer_losses.remote(
                [Request(id=i["id"], messages=self._messages(i["question"])) for i in self.pool],
                [i["answer"] for i in self.pool]))
            for item, loss in zip(scored, losses):
                item.gold_loss = tuple(loss)
        values = score_items(scored, strategy, selection.reduce, seed=self.config.seed * 1000 + round_index)
        order = rank(scored, values, skip_solved=selection.skip_solved, quota_by_group=selection.quota_by is not None,
                     proportional=selection.proportional, seed=self.config.seed * 1000 + round_index)
        faults.maybe_kill(self.run_dir, "score", round_index)
        judged = [s.correct for s in scored if s.correct is not None]
        result = {"order": [self.pool[i]["id"] for i in order],
                  "scores": {s.id: v for s, v in zip(scored, values)},
                  "pool_accuracy": sum(judged) / len(judged) if judged else None,
                  "seconds": time.perf_counter() - started}
        _write_json(path, result)
        return result

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
        started = time.perf_counter()
        config = self.config.teacher
        sampling = config.sampling.model_copy(update={"seed": (config.sampling.seed or 0) + round_index})
        caps = self._caps(round_index)
        by_id = {item["id"]: item for item in self.pool}
        batch_size = config.engine.batch_size
        batches = 0
        stopped = None
        order = [by_id[i] for i in scores["order"]]
        position = 0
        while position < len(order) and stopped is None:
            batch: list[tuple[str, dict, int]] = []
            spent = self.ledger.totals()
            self._engines()
            while position < len(order) and len(batch) < batch_size:
                item = order[position]
                key = request_key(self.recipe.name, round_index, item["id"])
                if key in self.ledger:
                    position += 1
                    continue
                prompt_tokens = ray.get(self.student.count_tokens.remote(self._teacher_request(item)))
                worst = prompt_tokens + sampling.max_tokens * sampling.n
                if not self.ledger.affords(caps, worst, [w for _, _, w in batch], spent):
                    stopped = "budget"
                    break
                batch.append((key, item, worst))
                position += 1
            if not batch:
                break
            answers = self._answer(self.teacher, [b[1] for b in batch], self._teacher_request, sampling)
            if all(isinstance(a, str) for a in answers):
                raise StageError(f"teacher {self.recipe.model('teacher')}: every request of a batch failed "
                                 f"({answers[0]}); the ledger keeps what was paid; rerun to continue")
            self.ledger.record([paid_entry(key, round_index, item["id"], answer)
                                for (key, item, _), answer in zip(batch, answers)])
            batches += 1
            faults.maybe_kill(self.run_dir, "teacher", round_index, batches)
        kept, rejected, groups = self._build_data(round_index, by_id)
        result = {"kept": len(kept), "rejected": len(rejected), "stopped_by": stopped or "seeds",
                  "selected_groups": groups, "seconds": time.perf_counter() - started}
        _write_jsonl(directory / "data.jsonl", kept)
        _write_jsonl(directory / "rejected.jsonl", rejected)
        _write_json(directory / "teacher.json", result)
        return result

    def _build_data(self, round_index: int, by_id: dict[str, dict]) -> tuple[list[dict], list[dict], dict]:
        """SFT rows from this round's paid answers, each checked: a written problem must be one the
        family's solver reads and agrees with; an answer must match the seed's gold answer."""
        from raypost.tasks import arith

        kept, rejected, groups = [], [], {}
        for entry in self.ledger.entries.values():
            if entry["round"] != round_index:
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
                    try:
                        exact = arith.solve(arith.parse_problem(question)).text
                    except arith.ParseError as error:
                        rejected.append({"key": entry["key"], "sample": k, "reason": f"unreadable problem: {error}"})
                        continue
                    if not _is_correct(solution, exact):
                        rejected.append({"key": entry["key"], "sample": k, "reason": "wrong solution"})
                        continue
                else:
                    question, solution = seed["question"], text
                    if seed["answer"] is not None and not _is_correct(solution, seed["answer"]):
                        rejected.append({"key": entry["key"], "sample": k, "reason": "wrong answer"})
                        continue
                kept.append({"id": f"{entry['key']}/{k}", "seed_id": seed["id"], "group": seed["group"],
                             "messages": [*self._messages(question), {"role": "assistant", "content": solution}]})
        return kept, rejected, groups

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
                        cache_dir=self.recipe.cache_dir, callbacks=[callback] if callback else None)
        losses = [h["loss"] for h in outcome.history if "loss" in h]
        result = {"model": outcome.model_dir, "rows": len(rows), "steps": outcome.steps,
                  "loss": losses[-1] if losses else None, "seconds": time.perf_counter() - started}
        _write_json(directory / "train.json", result)
        return result

    def _evaluate(self, round_index: int, model: str) -> dict:
        path = self.round_dir(round_index) / "eval.json"
        done = _read_json(path)
        if done is not None:
            return done
        self._engines()   # a start-up is not eval time
        started = time.perf_counter()
        sync = self._use_student(model)
        sampling = self.config.student.sampling.model_copy(update={
            "temperature": 0.0, "n": 1, "max_tokens": self.config.eval.max_tokens, "logprobs": None})
        answers = self._answer(self.student, self.eval_items, lambda i: self._messages(i["question"]), sampling)
        faults.maybe_kill(self.run_dir, "eval", round_index)
        per_item = []
        for item, answer in zip(self.eval_items, answers):
            text = answer[0].text if isinstance(answer, list) else ""
            per_item.append({"id": item["id"], "group": item["group"], "correct": bool(_is_correct(text, item["answer"])),
                             "error": answer if isinstance(answer, str) else None})
        _write_jsonl(self.round_dir(round_index) / "eval_items.jsonl", per_item)
        result = {"items": len(per_item), "correct": sum(i["correct"] for i in per_item), "groups": {},
                  "failed": sum(1 for i in per_item if i["error"]), "sync": sync,
                  "seconds": time.perf_counter() - started - (sync or {}).get("seconds", 0.0)}
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
