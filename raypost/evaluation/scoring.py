"""Scoring: the pass@k estimator, answer and letter extraction, and code execution.

Every benchmark reduces to samples that are correct or not; per item, `c` of `n` samples are
correct, and pass@k is estimated with the unbiased estimator of Chen et al. 2021 (Codex paper,
eq. 1): 1 - C(n-c, k) / C(n, k), averaged over items. With n = 1 and k = 1 this is accuracy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from raypost.evaluation.loaders import LETTERS


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c correct) is correct.

    Computed as a product (Chen et al. 2021, Figure 3) to stay exact for large n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass
class Score:
    extracted: str | None
    correct: bool
    error_kind: str | None  # None when correct; else why not (no_answer, wrong_answer, test_failed, ...)


# --- GSM8K -------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"(?i)answer\s+is\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def score_gsm8k(response: str, reference: str) -> Score:
    """Final-answer extraction, then exact numeric match (1,000 == 1000 == 1000.0)."""
    from raypost.verify.math_answer import answers_match, extract_answer

    text = response or ""
    # The prompt asks for "The answer is N." (Wei et al. 2022): where the model says so, the
    # number after the last such phrase wins over numbers in any text that follows it.
    stated = _ANSWER_IS.split(text)
    first = _NUMBER.search(stated[-1][:100]) if len(stated) > 1 else None
    extracted = (extract_answer(first.group()) if first else None) or extract_answer(text)
    if extracted is None:
        return Score(None, False, "no_answer")
    correct = bool(answers_match(extracted, reference))
    return Score(extracted, correct, None if correct else "wrong_answer")


# --- MMLU letters ------------------------------------------------------------------------

_KEYWORD = re.compile(
    r"(?i:answer|option|choice)\s*(?i:is|:|=)?\s*(?i:option|choice)?\s*[\(\[\*\s]*([A-D])(?![A-Za-z])")
_LEADING = re.compile(r"^\W*\(?([A-D])(?:[\.\):\]]|\s*$)")
_MARKED = re.compile(r"\(([A-D])\)|\*\*([A-D])\*\*|\[([A-D])\]")
_TRAILING = re.compile(r"(?<![A-Za-z'])([A-D])[\.\)]?\**\s*$")


def extract_letter(text: str | None, choices: Sequence[str] | None = None) -> str | None:
    """The option letter a generation settles on, or None.

    In order: an explicit "answer is (C)" / "Answer: C" (the last one wins, models restate);
    a reply that starts with the letter ("C", "C.", "(C)"); a single distinct marked letter
    "(C)" / "**C**"; a letter ending the reply ("... so it is C."); a reply that is exactly
    one option's text. A sentence starting with the article "A" is not an answer.
    """
    if not text or not text.strip():
        return None
    t = text.strip()
    keyed = _KEYWORD.findall(t)
    if keyed:
        return keyed[-1]
    marked = {next(g for g in m if g) for m in _MARKED.findall(t)}
    leading = _LEADING.match(t)
    if leading and len(marked) <= 1:  # "(A) 4 (B) 8" lists the options, it does not pick one
        return leading.group(1)
    if len(marked) == 1:
        return marked.pop()
    trailing = _TRAILING.search(t)
    if trailing and len(t.split()) <= 12:
        return trailing.group(1)
    if choices:
        normalized = t.rstrip(".").strip().lower()
        hits = [letter for letter, choice in zip(LETTERS, choices) if choice.strip().lower() == normalized]
        if len(hits) == 1:
            return hits[0]
    return None


def score_letter(response: str, reference: str, choices: Sequence[str] | None = None) -> Score:
    letter = extract_letter(response, choices)
    if letter is None:
        return Score(None, False, "no_answer")
    return Score(letter, letter == reference, None if letter == reference else "wrong_answer")


# --- code --------------------------------------------------------------------------------

def mbpp_code_from_response(response: str) -> str:
    """The solution in a reply: between [BEGIN] and [DONE] when marked, else a fenced block."""
    from raypost.verify.code import extract_code

    text = response or ""
    if "[BEGIN]" in text:
        text = text.split("[BEGIN]", 1)[1]
    text = text.split("[DONE]", 1)[0]
    if "```" in text:
        text = extract_code(text) or text
    return text.strip("\n")


def humaneval_completion_from_response(response: str, prompt: str, entry_point: str, style: str) -> str:
    """What goes after the HumanEval prompt: the raw continuation for completion-style prompts;
    for chat, the fenced code (a whole function redefines the prompt's docstring-only stub)."""
    if style == "completion":
        return response or ""
    from raypost.verify.code import extract_code, humaneval_completion

    return humaneval_completion(prompt, extract_code(response or ""), entry_point)


def code_error_kind(result) -> str | None:
    """Why a program did not pass, from its status and the traceback's last exception."""
    if result.status == "pass":
        return None
    if result.status == "timeout":
        return "timeout"
    stderr = result.stderr or ""
    if "SyntaxError" in stderr or "IndentationError" in stderr:
        return "syntax_error"
    if "AssertionError" in stderr:
        return "test_failed"
    if "Traceback" in stderr or "Error" in stderr or result.status == "fail":
        return "runtime_error"
    return "sandbox_error"


def run_programs(programs: list[str], codes: list[str], timeout_s: float, max_workers: int = 2) -> list[Score]:
    """Run each program in the sandbox; it passes when it exits 0 (all asserts hold).
    `codes` (the extracted solutions) are kept as what was extracted."""
    from raypost.verify.sandbox import run_many

    results = run_many(programs, max_workers=max_workers, timeout_s=timeout_s)
    return [Score(code, r.status == "pass", code_error_kind(r)) for code, r in zip(codes, results)]
