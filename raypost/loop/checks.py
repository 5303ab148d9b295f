"""What a loop item's answer is checked against, by the item's kind: a math item against its gold
answer (the final number), a code item against its tests, run in the sandbox.

A loop item is `{"id", "question", "answer", "tests", "group", "kind"}`: `answer` is the gold
solution of a math item (ending `#### N`), `tests` the tests spec of a code item (as
`raypost.verify.code.verify_code` takes it). One registry, so the controller never branches on
the kind: it asks whether an item can be checked at all (`unusable`), whether answers pass
(`check_many`), and whether two sampled answers are the same (`duplicate`: exact normalized text
for math; for code, an edit distance within `distance` of the answer's length, as arXiv 2412.08393
deduplicates code paths).
"""

from __future__ import annotations

import difflib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import pyarrow as pa

from raypost.runtime import unshared


def _normalized(text: str) -> str:
    from raypost.curation.dedup import normalize_text

    return normalize_text(text)


class MathCheck:
    def unusable(self, item: dict[str, Any]) -> str | None:
        from raypost.verify.math_answer import extract_answer

        return None if extract_answer(item.get("answer") or "") is not None else "gold answer cannot be parsed"

    def check_many(self, item: dict[str, Any], texts: Sequence[str]) -> list[bool]:
        from raypost.evaluation.scoring import score_gsm8k

        return [bool(score_gsm8k(text, item["answer"]).correct) for text in texts]

    def duplicate(self, text: str, kept: Sequence[str], distance: float) -> bool:
        normal = _normalized(text)
        return any(_normalized(k) == normal for k in kept)


class CodeCheck:
    """Each answer's code (between [BEGIN] and [DONE], or fenced) runs with the item's tests in
    the sandbox; it passes only when the tests ran to the end. Programs run in parallel (each
    sandbox is its own process)."""

    workers = 4

    def unusable(self, item: dict[str, Any]) -> str | None:
        tests = item.get("tests") or {}
        return None if tests.get("test_list") or tests.get("test") else "a code task without tests"

    def check_many(self, item: dict[str, Any], texts: Sequence[str]) -> list[bool]:
        from raypost.evaluation.scoring import mbpp_code_from_response
        from raypost.verify.code import verify_code

        def run(text: str) -> bool:
            return verify_code(mbpp_code_from_response(text), item["tests"])[0]

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(run, texts))

    def duplicate(self, text: str, kept: Sequence[str], distance: float) -> bool:
        for other in kept:
            if text == other:
                return True
            matcher = difflib.SequenceMatcher(None, text, other, autojunk=False)
            edits = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal")
            if edits <= distance * max(len(text), len(other)):
                return True
        return False


CHECKS = {"math": MathCheck(), "code": CodeCheck()}


def check_of(item: dict[str, Any]):
    return CHECKS[item.get("kind") or "math"]


def correct_of(item: dict[str, Any], text: str) -> bool:
    return check_of(item).check_many(item, [text])[0]


VERDICT_SCHEMA = pa.schema([("id", pa.string()), ("correct", pa.bool_())])


def verdicts(table: pa.Table, *, items: list) -> pa.Table:
    """Generation rows of loop items in, (id, correct) out: a Ray Data map on the workers, where
    a code item's answers run in the sandbox. `items`: [{id: item} or its object ref]."""
    by_id = unshared(items)
    ids, texts = table.column("id").to_pylist(), table.column("response").to_pylist()
    # a code item's answer runs in its own sandbox process: the block's answers run side by side
    with ThreadPoolExecutor(max_workers=CodeCheck.workers) as pool:
        correct = list(pool.map(lambda pair: bool(correct_of(by_id[pair[0]], pair[1] or "")), zip(ids, texts)))
    return pa.table({"id": pa.array(ids, pa.string()), "correct": pa.array(correct, pa.bool_())}, schema=VERDICT_SCHEMA)
