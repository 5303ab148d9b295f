"""The teacher budget ledger: every paid request, once, before its result is used.

Each request has a deterministic key (run, round, seed id, attempt). Its entry (tokens, cost and
the teacher's answer) is appended to `ledger.jsonl` and fsynced as soon as the answer arrives and
before anything reads that answer; a key already in the ledger is never sent again, so a rerun after
a crash reuses the answers it paid for. What is not closed by this: a request the teacher answered
but whose entry was not yet written when the driver died is sent again (an HTTP API gives no way to
collect an answer twice); that window is one batch wide.

Caps are checked before sending against the request's worst case (its prompt plus max_tokens per
sample), so the totals never pass a cap, whatever the teacher answers.

Entries have a kind: `answer` (the teacher writing or answering a seed, a SIPF rollout) and `vote`
(the teacher answering a problem it wrote, to check it) spend the budget; `judge` (the teacher
grading the student's answer, to choose seeds) is recorded and reported the same way but sits
outside the caps, so a judged loop gets the same data budget as the others and its selection
cost shows beside it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


BUDGET_KINDS = ("answer", "vote")


def request_key(run: str, round_index: int, seed_id: str, attempt: int = 0, kind: str = "answer") -> str:
    key = f"{run}/r{round_index}/{seed_id}/a{attempt}"
    return key if kind == "answer" else f"{key}/{kind}"


def paid_entry(key: str, round_index: int, seed_id: str, answer: list[Any] | str, kind: str = "answer") -> dict[str, Any]:
    """The ledger entry of one answered request: its completions (tokens, texts), or the error of
    a failed row, which reached the engine and so still counts as a request."""
    entry = {"key": key, "round": round_index, "seed_id": seed_id, "attempt": 0, "kind": kind}
    if isinstance(answer, str):
        return {**entry, "prompt_tokens": 0, "completion_tokens": 0, "error": answer}
    return {**entry, "prompt_tokens": answer[0].prompt_tokens,
            "completion_tokens": sum(c.completion_tokens for c in answer), "texts": [c.text for c in answer]}


@dataclass
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "tokens": self.tokens,
                "cost_usd": round(self.cost_usd, 6)}


@dataclass
class Caps:
    """What may have been spent by the end of a round (cumulative)."""

    requests: float = float("inf")
    tokens: float = float("inf")
    cost_usd: float = float("inf")


class Ledger:
    def __init__(self, path: str | os.PathLike, price_per_1k_tokens: float = 0.0):
        self.path = Path(path)
        self.price = price_per_1k_tokens
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    if number == len(lines):
                        break   # a line cut short by a kill mid-write: that request was not recorded
                    raise ValueError(f"{self.path}:{number}: not a JSON ledger entry") from None
                self.entries[entry["key"]] = entry
            self._rewrite_if_torn(lines)

    def _rewrite_if_torn(self, lines: list[str]) -> None:
        if lines and len(self.entries) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in self.entries.values()), encoding="utf-8")
            tmp.replace(self.path)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def cost(self, tokens: int) -> float:
        return tokens / 1000 * self.price

    def record(self, entries: Iterable[dict[str, Any]]) -> None:
        """Append paid requests (each with key, round, seed_id, prompt_tokens, completion_tokens, result)."""
        new = []
        for entry in entries:
            if entry["key"] in self.entries:
                raise ValueError(f"ledger: {entry['key']} was already paid for")
            tokens = entry["prompt_tokens"] + entry["completion_tokens"]
            new.append({**entry, "cost_usd": self.cost(tokens)})
        if not new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            for entry in new:
                handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for entry in new:
            self.entries[entry["key"]] = entry

    def totals(self, round_index: int | None = None, kinds: tuple[str, ...] = BUDGET_KINDS) -> Totals:
        """What the entries of `kinds` spent (default: what counts against the budget)."""
        totals = Totals()
        for entry in self.entries.values():
            if round_index is not None and entry["round"] != round_index:
                continue
            if entry.get("kind", "answer") not in kinds:
                continue
            totals.requests += 1
            totals.prompt_tokens += entry["prompt_tokens"]
            totals.completion_tokens += entry["completion_tokens"]
            totals.cost_usd += entry["cost_usd"]
        return totals

    def affords(self, caps: Caps, worst_tokens: int, pending: Iterable[int] = (), spent: Totals | None = None,
                requests: int = 1) -> bool:
        """Whether one more item whose worst case is `worst_tokens` stays within `caps`, after
        what is spent (`spent`, default the ledger's totals) and the items of the batch being
        built but not yet sent (`pending`: their worst cases). An item is `requests` requests
        (a written problem and its votes), and so is each pending one."""
        spent = spent or self.totals()
        pending = list(pending)
        held = sum(pending) + worst_tokens
        return (spent.requests + (len(pending) + 1) * requests <= caps.requests
                and spent.tokens + held <= caps.tokens
                and spent.cost_usd + self.cost(held) <= caps.cost_usd + 1e-12)
