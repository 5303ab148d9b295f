"""A model as judge: one prompt that rates an answer 1-10, and reading the rating back.

Curation's response selection (`scorer: judge`) and the closed loop's `judge` strategy send the
same prompt, so any engine that can follow it (vLLM, an OpenAI-compatible endpoint, or the
procedural simulator, which grades by solving the question itself) serves both.
"""

from __future__ import annotations

import re

JUDGE_PROMPT = (
    "Rate how good the answer below is for the question, from 1 (wrong or useless) to 10 "
    "(correct and clear). Reply with the number only.\n\nQuestion:\n{question}\n\nAnswer:\n{answer}"
)
_REQUEST = re.compile(re.escape(JUDGE_PROMPT.split("\n\n")[0]) + r"\n\nQuestion:\n(?P<q>.*?)\n\nAnswer:\n?(?P<a>.*)\Z",
                      re.S)


def judge_messages(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": JUDGE_PROMPT.format(question=question, answer=answer)}]


def read_judge_request(text: str) -> tuple[str, str] | None:
    """(question, answer) of a judge prompt, or None when `text` is not one."""
    match = _REQUEST.match(text.lstrip())
    return (match.group("q"), match.group("a")) if match else None


def parse_grade(text: str) -> float:
    """The judge's rating, 1-10 (a larger number is taken as 10); 0 when it gives no number."""
    found = re.search(r"\d+", text or "")
    return float(min(10, int(found.group()))) if found else 0.0
