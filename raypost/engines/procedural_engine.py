"""A simulated strong teacher for procedural task families (`backend: procedural`).

No model fits a 2-core machine that is much stronger than a 135M student, yet the methods
raypost runs (teacher-guided data construction, the closed loop, process feedback) need one.
For a task family with exact solutions (raypost.tasks) this engine plays that teacher:

- asked a question of the family, it answers with the exact chain of thought, for any new
  question, not only stored ones (unlike `reference`, which replays gold answers);
- asked to write a new problem from a seed (`raypost.tasks.arith.rewrite_prompt`), it writes a
  new problem of the same level and digits, with its solution, as an LLM teacher would;
- with `error_rate`, that share of answers carries a wrong step to the end (decided by a hash of
  the question and the sample, so reruns reproduce it), so verification has something to catch;
- asked to judge an answer (`raypost.engines.judge.JUDGE_PROMPT`), it solves the question and
  rates the answer 1-10: 10 when its final answer is right, else by how far its chain of
  intermediate results got (`arith.grade`);
- asked to continue an open assistant turn (a reasoning prefix, as SIPF's rollouts do), it
  writes the solution after it, its errors drawn per (question, prefix, sample): a simulator
  whose rollouts differ from prefix to prefix.

A question it cannot read is an error for that row (set aside with its reason), never a guess.
Tokens are counted with `engine.tokenizer` (the student's, so budgets compare with a real
teacher's), else as whitespace words. Every recipe that uses it runs with a vLLM or OpenAI
teacher by changing `engine.backend` and the model.
"""

from __future__ import annotations

import random
from typing import Sequence

from raypost.config import EngineConfig, SamplingConfig
from raypost.engines.base import Completion, Request
from raypost.engines.judge import read_judge_request
from raypost.tasks import arith

FAMILIES = {"arith": arith}


class ProceduralEngine:
    backend = "procedural"

    def __init__(self, model: str, config: EngineConfig, cache_dir: str | None = None):
        family = model.split(":", 1)[1] if model.startswith("procedural:") else model
        if family not in FAMILIES:
            raise ValueError(f"procedural engine: unknown task family {family!r} (model {model!r}); "
                             f"known: {', '.join('procedural:' + f for f in FAMILIES)}")
        self.model = model
        self.family = FAMILIES[family]
        self.error_rate = config.error_rate
        self.calls = 0
        self._tokenizer = None
        if config.tokenizer:
            from transformers import AutoTokenizer

            from raypost.models import resolve_model

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.tokenizer, cache_dir))

    @property
    def tokenizer(self):
        """The tokenizer that counts this engine's tokens (None: whitespace words)."""
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is None:
            return len(text.split())
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[Completion]]:
        return [self._answer(request, sampling) for request in requests]

    def _answer(self, request: Request, sampling: SamplingConfig) -> list[Completion]:
        prompt = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), None)
        if prompt is None:
            raise arith.ParseError("no user message to answer")
        judged = read_judge_request(prompt)
        rewrite = self.family.is_rewrite_request(prompt)
        # ParseError: the row is set aside with its reason
        problem = self.family.parse_problem(judged[0] if judged else prompt)
        prompt_tokens = sum(self.count_tokens(m["content"]) for m in request.messages)
        if judged:
            grade = str(self.family.grade(problem, judged[1]))
            self.calls += 1
            return [self._completion(grade, prompt_tokens, sampling) for _ in range(sampling.n)]
        completions = []
        prefix = request.messages[-1]["content"] if request.messages[-1]["role"] == "assistant" else None
        for k in range(sampling.n):
            key = (prompt, sampling.seed, k) if prefix is None else (prompt, prefix, sampling.seed, k)
            text = self._rewrite(problem, key) if rewrite else self._solve(problem, key).text
            completions.append(self._completion(text, prompt_tokens, sampling))
        self.calls += 1
        return completions

    def _solve(self, problem, key) -> "arith.Solution":
        rng = random.Random(arith.stable_seed("error", *key))
        if self.error_rate and rng.random() < self.error_rate:
            return arith.solve(problem, error_at=rng.randrange(problem.level), error_delta=rng.choice([-2, -1, 1, 2, 10]))
        return arith.solve(problem)

    def _rewrite(self, seed_problem, key) -> str:
        rng = random.Random(arith.stable_seed("rewrite", *key))
        new, question = self.family.make_problem(rng, seed_problem.level, digits=seed_problem.digits,
                                                 distractors=rng.choice([0, 0, 1]))
        return f"Problem: {question}\nSolution:\n{self._solve(new, key).text}"

    def _completion(self, text: str, prompt_tokens: int, sampling: SamplingConfig) -> Completion:
        finish = "stop"
        if self._tokenizer is not None:
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > sampling.max_tokens:
                text, finish = self._tokenizer.decode(ids[: sampling.max_tokens]), "length"
            tokens = min(len(ids), sampling.max_tokens)
        else:
            words = text.split(" ")
            if len(words) > sampling.max_tokens:
                text, finish = " ".join(words[: sampling.max_tokens]), "length"
            tokens = min(len(words), sampling.max_tokens)
        return Completion(text=text, completion_tokens=tokens, prompt_tokens=prompt_tokens, finish_reason=finish)

    def close(self) -> None:
        pass
