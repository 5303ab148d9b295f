"""Accuracy checks shared by curation and evaluation: math answers and sandboxed code."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from raypost import schema
from raypost.verify.code import (build_program, describe, extract_code, humaneval_program,
                                 mbpp_program, verify_code)
from raypost.verify.math_answer import (answers_match, extract_answer, normalize_number,
                                        reference_answer, verify_math)
from raypost.verify.sandbox import SandboxResult, isolation_mode, run_many, run_python

__all__ = [
    "SandboxResult", "answers_match", "build_program", "extract_answer", "extract_code",
    "humaneval_program", "isolation_mode", "mbpp_program", "normalize_number", "reference_answer",
    "run_many", "run_python", "verify_code", "verify_math", "verify_rows",
]


def _code_check(response: str, reference) -> tuple[bool, str]:
    try:
        spec = json.loads(reference) if isinstance(reference, (str, bytes)) else reference
        if not isinstance(spec, dict):
            raise ValueError("not a JSON object")
    except (ValueError, TypeError) as e:
        return False, f"error: bad tests_spec in reference: {e}"
    return verify_code(response, spec)


def verify_rows(rows: list[dict], kind: Literal["math", "code"], response_field: str = "response",
                reference_field: str = "reference", max_workers: int = 2) -> list[dict]:
    """Copies of `rows` with `verified: bool` and `verify_reason: str` added.

    math: the reference is an answer or a GSM8K solution. code: the reference is a JSON tests_spec
    (see `verify_code`); programs run in sandboxes, `max_workers` at a time. A row missing its
    response or reference is not verified and says so; it is never dropped.
    """
    if kind not in ("math", "code"):
        raise ValueError(f"kind must be 'math' or 'code', got {kind!r}")
    check = verify_math if kind == "math" else _code_check

    def one(row: dict) -> tuple[bool, str]:
        response, reference = row.get(response_field), row.get(reference_field)
        if response is None:
            return False, f"missing {response_field}"
        if reference is None or reference == "":
            return False, f"missing {reference_field}"
        return check(str(response), reference)

    if kind == "code" and len(rows) > 1:
        with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
            outcomes = list(pool.map(one, rows))
    else:
        outcomes = [one(row) for row in rows]
    return [{**row, schema.VERIFIED: ok, schema.VERIFY_REASON: reason} for row, (ok, reason) in zip(rows, outcomes)]
