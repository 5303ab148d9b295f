"""Self-iterative process feedback (SIPF, arXiv 2412.08393) as a mode of the closed loop.

A round, for the current student: sample `n` reasoning paths per question at a high temperature;
drop duplicates; label each by its final answer; split each into steps; from every step's prefix
(the assistant turn left open) a simulator completes `k` rollouts, and the step's value is the
share of them that reach the gold answer (correct when above `delta`); a path scores the mean (or
min) of its step values; pairs whose scores differ by at least `eta` train the student with ORPO
(or DPO), the pairs accumulating across rounds; then the held-out evaluation. `reward: outcome` is
the ablation: correct against wrong paths from the same samples, no rollouts.

It is the loop's controller with other phases (`sample`, `rollout`, `pairs`), not a second loop:
the engines stay up across rounds, each round's weights go into the running student, every phase
writes its result only when complete, and every rollout request goes through the ledger (keyed by
round, question and prefix; fsynced before use), so a driver killed anywhere resumes with no
rollout paid twice. The ledger's totals are the rollout tokens, and the report plots accuracy
against them.

Process rewards are the Monte-Carlo values themselves (`reward: process`), or, as the paper
does, a process reward model trained on their labels (`reward: prm`): each round, a token-
classification head on the student's architecture (raypost/training/prm.py, on Ray Train) learns
the step labels of every round so far, minus a held-out share of questions on which its step
accuracy and ROC AUC are measured against the outcome-only baseline (every step labelled as its
path's outcome); its step scores then rank this round's paths.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from dataclasses import dataclass

from raypost.engines.base import Request
from raypost.loop import checks, faults
from raypost.loop.config import SipfConfig, SplitConfig
from raypost.loop.controller import LoopController, _read_json, _read_jsonl, _write_json, _write_jsonl
from raypost.loop.ledger import paid_entry

_SENTENCE_END = re.compile(r"(?<=[.?!])[ \t]+|\n")


@dataclass
class Step:
    start: int
    end: int   # exclusive; includes the separator after the step, so a prefix ends where the next begins


def split_steps(text: str, config: SplitConfig) -> list[Step]:
    """Steps of a reasoning path as character spans; blank spans are not steps."""
    if config.by == "line":
        boundary = re.compile(r"\n")
    elif config.by == "sentence":
        boundary = _SENTENCE_END
    else:
        boundary = re.compile(config.pattern)
    steps, start = [], 0
    for match in boundary.finditer(text):
        if match.end() <= start:
            continue
        if text[start:match.start()].strip():
            steps.append(Step(start, match.end()))
        elif steps:   # a blank separator belongs to the step before it
            steps[-1].end = match.end()
        else:
            continue
        start = match.end()
    if text[start:].strip():
        steps.append(Step(start, len(text)))
    elif steps:   # trailing blank text belongs to the last step
        steps[-1].end = len(text)
    return steps


def prefix_key(run: str, round_index: int, question_id: str, prefix: str) -> str:
    return f"{run}/r{round_index}/{question_id}/{hashlib.sha256(prefix.encode()).hexdigest()[:16]}"


def path_score(values: list[float], reduce: str) -> float:
    return min(values) if reduce == "min" else sum(values) / len(values)


def make_pairs(paths: list[dict], eta: float, limit: int) -> list[tuple[dict, dict]]:
    """Up to `limit` (winner, loser) pairs with a score gap >= eta: widest gaps first, and pairs
    of paths not yet used before pairs that reuse one."""
    candidates = [(a["score"] - b["score"], a["index"], b["index"], a, b)
                  for a in paths for b in paths if a["score"] - b["score"] >= eta and a["score"] > b["score"]]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    chosen, taken, used = [], set(), set()
    for fresh_only in (True, False):
        for gap, i, j, a, b in candidates:
            if len(chosen) >= limit:
                return chosen
            if (i, j) in taken or (fresh_only and (i in used or j in used)):
                continue
            chosen.append((a, b))
            taken.add((i, j))
            used.update((i, j))
    return chosen


def step_prefixes(paths) -> list[tuple[str, str]]:
    """(question id, prefix) of every step of these paths that needs rollouts (not the last
    step: its value is the path's own outcome), each distinct pair once, in path order."""
    return list(dict.fromkeys((path["question_id"], path["text"][:end])
                              for path in paths for _, end in path["steps"][:-1]))


def rollout_messages(question_messages: list[dict[str, str]], prefix: str) -> list[dict[str, str]]:
    """The conversation a rollout continues: the question, then the open assistant turn."""
    return [*question_messages, {"role": "assistant", "content": prefix}]


def _prm_step_scores(model_dir: str, targets: list, max_length: int) -> list[list[float]]:
    """In a Ray task: the scoring model (torch, transformers) stays out of the driver."""
    from raypost.training.prm import step_scores

    return step_scores(model_dir, targets, max_length)


class SipfController(LoopController):
    @property
    def sipf(self) -> SipfConfig:
        return self.config.sipf

    def strategy_name(self) -> str:
        return f"sipf-{self.sipf.reward}"

    def needs_teacher(self) -> bool:
        return self.sipf.simulator == "teacher"

    # --- round 0: the SFT warm-up the paper starts from --------------------------------------

    def _baseline(self) -> None:
        if self.sipf.warmup is not None:
            self._warmup()
        super()._baseline()

    def _warmup(self) -> None:
        from raypost.training.train import train

        directory = self.round_dir(0)
        if (directory / "train.json").exists():
            return
        started = time.perf_counter()
        items = self.pool
        if self.sipf.warmup_pool is not None:
            pool_questions = {i["question"] for i in self.pool}
            items = self._load_pool(self.sipf.warmup_pool, self.run_dir / "warmup_pool.jsonl", "warmup_pool",
                                    exclude_also=pool_questions)
            # a file pool may share questions with the loop's: those stay out of the warm-up
            items = [i for i in items if i["question"] not in pool_questions]
        data = directory / "warmup_data.jsonl"
        _write_jsonl(data, [{"messages": [*self._messages(i["question"]), {"role": "assistant", "content": i["answer"]}]}
                            for i in items if i.get("answer")])
        callback = faults.training_callback(self.run_dir, 0)
        outcome = train(self.sipf.warmup, model=self.base_model, dataset=data, output_dir=directory / "train",
                        resume=True, cache_dir=self.recipe.cache_dir, callbacks=[callback] if callback else None,
                        resident=self.resident_trainer())
        losses = [h["loss"] for h in outcome.history if "loss" in h]
        rows = outcome.rows
        _write_json(directory / "train.json", {"model": outcome.model_dir, "rows": rows,
                                               "steps": outcome.steps, "loss": losses[-1] if losses else None,
                                               "seconds": time.perf_counter() - started})
        source = "the warm-up pool's" if self.sipf.warmup_pool is not None else "the pool's"
        self.log(f"round 0: warm-up SFT on {rows} of {source} gold solutions, {outcome.steps} steps")

    # --- a round -----------------------------------------------------------------------------

    def run_round(self, round_index: int) -> dict:
        directory = self.round_dir(round_index)
        record = _read_json(directory / "record.json")
        if record is not None:
            self.log(f"round {round_index}: done before (accuracy {record['accuracy']:.3f})")
            return record
        previous = self.model_after(round_index - 1)
        sampled = self._sample(round_index, previous)
        rollouts = self._rollouts(round_index, previous)
        prm = self._prm(round_index) if self.sipf.reward == "prm" else None
        pairs = self._pairs(round_index)
        trained = self._train(round_index, previous)
        evaluation = self._evaluate(round_index, trained["model"])
        totals = self.ledger.totals()
        record = {
            "round": round_index, "strategy": self.strategy_name(), "model": trained["model"],
            **self._accuracy_fields(evaluation),
            "pool_accuracy": sampled["paths_correct"] / max(1, sampled["paths_unique"]),
            "questions": sampled["questions"], "paths_sampled": sampled["paths_sampled"],
            "paths_unique": sampled["paths_unique"], "rejected": sampled["rejected"],
            "steps": pairs["steps"], "steps_correct": pairs["steps_correct"],
            "pairs": pairs["pairs"], "pairs_both_correct": pairs["pairs_both_correct"],
            "questions_without_pair": pairs["questions_without_pair"],
            "teacher_round": self.ledger.totals(round_index).as_dict(), "teacher_total": totals.as_dict(),
            "rollout_requests": rollouts["requests"], "rollouts": rollouts["rollouts"],
            "train_rows": trained["rows"], "train_steps": trained["steps"], "train_loss": trained.get("loss"),
            "trainer": trained.get("trainer"),
            "weight_sync": evaluation.get("sync"),
            "prm": None if prm is None else {k: v for k, v in prm.items() if k != "seconds"},
            "seconds": {"sample": sampled["seconds"], "rollout": rollouts["seconds"], "pairs": pairs["seconds"],
                        **({"prm": prm["seconds"]} if prm else {}),
                        "train": trained["seconds"], "weight_sync": (evaluation.get("sync") or {}).get("seconds", 0.0),
                        "eval": evaluation["seconds"]},
        }
        _write_json(directory / "record.json", record)
        self.tracker.log(record)
        self.log(f"round {round_index}: accuracy {record['accuracy']:.3f} [{record['accuracy_ci95'][0]:.3f}, "
                 f"{record['accuracy_ci95'][1]:.3f}]; {sampled['paths_unique']} unique paths of "
                 f"{sampled['paths_sampled']} ({sampled['paths_correct']} correct), {rollouts['rollouts']} rollouts "
                 f"({record['teacher_round']['tokens']} tokens), {pairs['pairs']} pairs; trained {trained['steps']} "
                 f"steps on {trained['rows']} pairs")
        return record

    def _questions(self, round_index: int) -> list[dict]:
        count = self.sipf.questions_per_round
        if count is None or count >= len(self.pool):
            return list(self.pool)
        rng = random.Random(self.config.seed * 1000 + round_index)
        return [self.pool[i] for i in sorted(rng.sample(range(len(self.pool)), count))]

    def _sample(self, round_index: int, model: str) -> dict:
        """The student's own paths: deduplicated, labelled by outcome, split into steps."""
        directory = self.round_dir(round_index)
        done = _read_json(directory / "sample.json")
        if done is not None:
            return done
        started = time.perf_counter()
        questions, rejected = [], []
        for item in self._questions(round_index):
            reason = checks.check_of(item).unusable(item)
            if reason is not None:
                rejected.append({"id": item["id"], "reason": reason})
            else:
                questions.append(item)
        self._use_student(model)
        sampling = self.config.student.sampling.model_copy(update={
            "n": self.sipf.n, "temperature": self.sipf.temperature, "top_p": self.sipf.top_p,
            "max_tokens": self.sipf.max_tokens, "logprobs": None, "seed": self.config.seed * 1000 + round_index})
        answers = self._answer(self.student, questions, lambda i: self._messages(i["question"]), sampling)
        faults.maybe_kill(self.run_dir, "sample", round_index)
        paths, sampled, tokens = [], 0, 0
        for item, answer in zip(questions, answers):
            if isinstance(answer, str):
                rejected.append({"id": item["id"], "reason": f"sampling failed: {answer}"})
                continue
            check = checks.check_of(item)
            kept: list[str] = []
            mine: list[dict] = []
            for completion in answer:
                sampled += 1
                tokens += completion.completion_tokens or 0
                text = completion.text
                steps = split_steps(text, self.sipf.split)
                if not steps:
                    rejected.append({"id": item["id"], "reason": "a path with no steps"})
                    continue
                if check.duplicate(text, kept, self.sipf.dedup_distance):
                    continue
                kept.append(text)
                mine.append({"question_id": item["id"], "group": item["group"], "index": len(kept) - 1,
                             "text": text, "steps": [[s.start, s.end] for s in steps]})
            for path, correct in zip(mine, check.check_many(item, kept)):
                path["correct"] = bool(correct)
            paths.extend(mine)
        result = {"questions": len(questions), "paths_sampled": sampled, "completion_tokens": tokens,
                  "paths_unique": len(paths),
                  "paths_correct": sum(p["correct"] for p in paths), "rejected": len(rejected),
                  "rejected_reasons": sorted({r["reason"] for r in rejected}),
                  "seconds": time.perf_counter() - started}
        _write_jsonl(directory / "paths.jsonl", paths)
        _write_jsonl(directory / "rejected.jsonl", rejected)
        _write_json(directory / "sample.json", result)
        return result

    def _prefixes(self, round_index: int) -> dict[str, tuple[dict, str]]:
        """Every step prefix of this round's paths that needs rollouts (not the last step: its value
        is the path's own outcome), one key per distinct (question, prefix)."""
        by_id = {item["id"]: item for item in self.pool}
        return {prefix_key(self.recipe.name, round_index, question_id, prefix): (by_id[question_id], prefix)
                for question_id, prefix in step_prefixes(_read_jsonl(self.round_dir(round_index) / "paths.jsonl"))}

    def _rollouts(self, round_index: int, model: str) -> dict:
        import ray

        directory = self.round_dir(round_index)
        done = _read_json(directory / "rollout.json")
        if done is not None:
            return done
        started = time.perf_counter()
        if self.sipf.reward == "outcome":
            result = {"requests": 0, "rollouts": 0, "stopped_by": "outcome reward: no rollouts",
                      "seconds": time.perf_counter() - started}
            _write_json(directory / "rollout.json", result)
            return result
        wanted = self._prefixes(round_index)
        missing = [(key, item, prefix) for key, (item, prefix) in wanted.items() if key not in self.ledger]
        if self.sipf.simulator == "student":
            self._use_student(model)
            simulator = self.student
        else:
            self._engines()
            simulator = self.teacher
        sampling = self.config.student.sampling.model_copy(update={
            "n": self.sipf.k, "temperature": self.sipf.temperature, "top_p": self.sipf.top_p,
            "max_tokens": self.sipf.rollout_max_tokens, "logprobs": None})
        caps = self._caps(round_index)
        batch_size = max(1, self.config.student.engine.batch_size)
        stopped, batches = None, 0
        for start in range(0, len(missing), batch_size):
            batch = missing[start:start + batch_size]
            if self.config.budget is not None:   # checked against the worst case before sending
                counts = ray.get(self.student.count_tokens_many.remote([self._rollout_messages(i, p) for _, i, p in batch]))
                spent = self.ledger.totals()
                fits, pending = [], []
                for (key, item, prefix), count in zip(batch, counts):
                    worst = count + sampling.max_tokens * sampling.n
                    if not self.ledger.affords(caps, worst, pending, spent):
                        stopped = "budget"
                        break
                    fits.append((key, item, prefix))
                    pending.append(worst)
                batch = fits
                if not batch:
                    break
            # one batch of prefixes shares a seed derived from its first key: a rerun after a
            # crash sends the same batches as the first run did
            seed = int(hashlib.sha256(batch[0][0].encode()).hexdigest()[:8], 16)
            requests = [Request(id=key, messages=self._rollout_messages(item, prefix)) for key, item, prefix in batch]
            answers = ray.get(simulator.generate.remote(requests, sampling.model_copy(update={"seed": seed})))
            self.ledger.record([paid_entry(key, round_index, item["id"], answer)
                                for (key, item, _), answer in zip(batch, answers)])
            batches += 1
            faults.maybe_kill(self.run_dir, "rollout", round_index, batches)
            if stopped:
                break
        this_round = [e for e in self.ledger.entries.values() if e["round"] == round_index]
        result = {"requests": len(this_round), "prefixes": len(wanted),
                  "rollouts": sum(len(e.get("texts", [])) for e in this_round),
                  "failed": sum(1 for e in this_round if "error" in e), "stopped_by": stopped or "prefixes",
                  "seconds": time.perf_counter() - started}
        _write_json(directory / "rollout.json", result)
        return result

    def _mc_values(self, round_index: int, item: dict, path: dict) -> list[float] | None:
        """Each step's Monte-Carlo value: the share of its rollouts (prefix + continuation) that
        pass the item's check; the last step's is the path's own outcome. None when a prefix was
        not rolled out (budget) or its rollouts failed: such a path is not labelled."""
        values = []
        for _, end in path["steps"][:-1]:
            prefix = path["text"][:end]
            entry = self.ledger.entries.get(prefix_key(self.recipe.name, round_index, item["id"], prefix))
            if entry is None or "error" in entry:
                return None
            values.append(sum(checks.check_of(item).check_many(item, [prefix + t for t in entry["texts"]]))
                          / len(entry["texts"]))
        return values + [1.0 if path["correct"] else 0.0]

    def _held_out(self, question_id: str) -> bool:
        digest = int(hashlib.sha256(f"{self.config.seed}/{question_id}".encode()).hexdigest()[:8], 16)
        return digest % 1000 < self.sipf.prm_holdout * 1000

    def _prm(self, round_index: int) -> dict:
        """Train the process reward model on the step labels of every round so far (held-out
        questions apart), measure it on the held-out steps, and score this round's paths."""
        import ray

        from raypost.curation.entropy import entropy_auc   # ROC AUC of a score against "wrong"
        from raypost.training.train import train

        directory = self.round_dir(round_index)
        done = _read_json(directory / "prm.json")
        if done is not None:
            return done
        started = time.perf_counter()
        by_id = {item["id"]: item for item in self.pool}
        training, held_out = [], []
        for r in range(1, round_index + 1):
            for path in _read_jsonl(self.round_dir(r) / "paths.jsonl"):
                item = by_id[path["question_id"]]
                values = self._mc_values(r, item, path)
                if values is None:
                    continue
                row = {"prompt": self._messages(item["question"]),
                       "completions": [path["text"][a:b] for a, b in path["steps"]],
                       "labels": [v > self.sipf.delta for v in values], "outcome": path["correct"]}
                (held_out if self._held_out(item["id"]) else training).append(row)
        result: dict = {"train_paths": len(training), "held_out_paths": len(held_out)}
        if not training:
            result.update(model=None, note="no labelled paths to learn from", seconds=time.perf_counter() - started)
            _write_json(directory / "prm.json", result)
            return result
        data = directory / "prm_data.jsonl"
        _write_jsonl(data, [{k: row[k] for k in ("prompt", "completions", "labels")} for row in training])
        outcome = train(self.sipf.prm, model=self.base_model, dataset=data, output_dir=directory / "prm",
                        resume=True, cache_dir=self.recipe.cache_dir, resident=self.resident_trainer())
        this_round = _read_jsonl(directory / "paths.jsonl")
        targets = [(row["prompt"], row["completions"]) for row in held_out]
        targets += [(self._messages(by_id[p["question_id"]]["question"]), [p["text"][a:b] for a, b in p["steps"]])
                    for p in this_round]
        scored = ray.get(ray.remote(num_cpus=1)(_prm_step_scores).remote(outcome.model_dir, targets,
                                                                         self.sipf.prm.block.max_length))
        labels, predicted, baseline = [], [], []
        for row, scores in zip(held_out, scored):
            for label, score in zip(row["labels"], scores):
                labels.append(label)
                predicted.append(score)
                baseline.append(1.0 if row["outcome"] else 0.0)
        if labels:
            result["held_out_steps"] = len(labels)
            result["step_accuracy"] = sum((s > 0.5) == l for s, l in zip(predicted, labels)) / len(labels)
            result["roc_auc"] = entropy_auc(predicted, [not label for label in labels])
            result["outcome_baseline_accuracy"] = sum((b > 0.5) == l for b, l in zip(baseline, labels)) / len(labels)
            result["outcome_baseline_roc_auc"] = entropy_auc(baseline, [not label for label in labels])
        _write_jsonl(directory / "prm_scores.jsonl", [{"question_id": p["question_id"], "index": p["index"], "scores": s}
                                                     for p, s in zip(this_round, scored[len(held_out):])])
        result.update(model=outcome.model_dir, steps=outcome.steps, seconds=time.perf_counter() - started)
        _write_json(directory / "prm.json", result)
        return result

    def _rollout_messages(self, item: dict, prefix: str) -> list[dict[str, str]]:
        return rollout_messages(self._messages(item["question"]), prefix)

    def _pairs(self, round_index: int) -> dict:
        """Step values from the rollouts, path scores, and this round's preference pairs."""
        directory = self.round_dir(round_index)
        done = _read_json(directory / "pairs.json")
        if done is not None:
            return done
        started = time.perf_counter()
        by_id = {item["id"]: item for item in self.pool}
        paths = _read_jsonl(directory / "paths.jsonl")
        labelled, unlabelled = [], 0
        prm_scores = {(r["question_id"], r["index"]): r["scores"] for r in _read_jsonl(directory / "prm_scores.jsonl")}
        for path in paths:
            item = by_id[path["question_id"]]
            if self.sipf.reward == "outcome":
                values = [1.0 if path["correct"] else 0.0]
            elif self.sipf.reward == "prm":
                values = prm_scores.get((path["question_id"], path["index"])) or None
            else:
                values = self._mc_values(round_index, item, path)
            if values is None:
                unlabelled += 1
                continue
            labelled.append({**path, "values": values, "labels": [v > self.sipf.delta for v in values],
                             "score": path_score(values, self.sipf.reduce)})
        per_question: dict[str, list[dict]] = {}
        for path in labelled:
            per_question.setdefault(path["question_id"], []).append(path)
        rows, both_correct = [], 0
        for question_id, group in per_question.items():
            item = by_id[question_id]
            for winner, loser in make_pairs(group, self.sipf.eta, self.sipf.pairs_per_question):
                both_correct += winner["correct"] and loser["correct"]
                rows.append({"id": f"r{round_index}/{question_id}/{winner['index']}-{loser['index']}",
                             "seed_id": question_id, "group": item["group"],
                             "prompt": self._messages(item["question"]),
                             "chosen": [{"role": "assistant", "content": winner["text"]}],
                             "rejected": [{"role": "assistant", "content": loser["text"]}],
                             "scores": [winner["score"], loser["score"]]})
        steps = [label for path in labelled for label in path["labels"]]
        result = {"paths_labelled": len(labelled), "paths_unlabelled": unlabelled, "pairs": len(rows),
                  "pairs_both_correct": both_correct, "steps": len(steps), "steps_correct": sum(steps),
                  "questions_without_pair": len({p["question_id"] for p in paths}) - len({r["seed_id"] for r in rows}),
                  "seconds": time.perf_counter() - started}
        _write_jsonl(directory / "labelled.jsonl", labelled)
        _write_jsonl(directory / "data.jsonl", rows)
        _write_json(directory / "pairs.json", result)
        return result

