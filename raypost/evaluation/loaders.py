"""Benchmark files in their standard formats, from any path.

    load_gsm8k(path)       GSM8K JSONL: question, answer ("... #### 72")
    load_mbpp(path)        mbpp.jsonl (text, code, test_list, test_setup_code, task_id) or
                           sanitized-mbpp.json (prompt, code, test_imports, test_list, task_id)
    load_humaneval(path)   HumanEval.jsonl(.gz): task_id, prompt, canonical_solution, test, entry_point
    load_mmlu(path, ...)   MMLU CSV rows without header: question, A, B, C, D, answer; a file or a
                           directory of `<subject>_test.csv` (or `_dev.csv`) files

Each returns `Loaded(items, rejected)`: a bad row is set aside with its file:line and reason,
never dropped silently and never fatal for the rest of the file.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from raypost.records import DataError, Rejected, iter_source_rows

MMLU_MATH_SUBJECTS = ("elementary_mathematics", "high_school_mathematics", "college_mathematics")
LETTERS = ("A", "B", "C", "D")


@dataclass
class EvalItem:
    """One benchmark task. `reference` is what scoring compares against (a number, a letter,
    or the reference code); `fields` keeps what prompt building and scoring need."""

    id: str
    reference: str
    fields: dict[str, Any]
    subject: str = ""


@dataclass
class Loaded:
    items: list[EvalItem] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


def _reject(loaded: Loaded, location: str, row: Any, reason: str, row_id: str | None = None) -> None:
    loaded.rejected.append(Rejected(row_id, row if isinstance(row, dict) else {"raw": row}, location, reason))


def _dedupe(loaded: Loaded, item: EvalItem, location: str, row: dict, seen: set[str]) -> None:
    if item.id in seen:
        _reject(loaded, location, row, "duplicate id", item.id)
    else:
        seen.add(item.id)
        loaded.items.append(item)


# --- GSM8K -------------------------------------------------------------------------------

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


def gsm8k_final_answer(solution: str) -> str | None:
    """The number after `####` in a GSM8K solution, without thousands separators."""
    match = _GSM8K_FINAL.search(solution)
    if not match:
        return None
    value = match.group(1).replace(",", "").replace("$", "").strip()
    return value if re.fullmatch(r"-?\d+(\.\d+)?", value) else None


def load_gsm8k(path: str | os.PathLike) -> Loaded:
    loaded, seen = Loaded(), set()
    stem = Path(path).name.split(".")[0]
    for index, (location, row) in enumerate(iter_source_rows(path)):
        if isinstance(row, Exception):
            _reject(loaded, location, {}, str(row))
            continue
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            _reject(loaded, location, row, "missing or empty field 'question'")
            continue
        if not isinstance(answer, str):
            _reject(loaded, location, row, "missing field 'answer'")
            continue
        final = gsm8k_final_answer(answer)
        if final is None:
            _reject(loaded, location, row, "field 'answer' has no numeric '#### N' final answer")
            continue
        item_id = str(row.get("id", f"{stem}-{index}"))
        # procedural sets (raypost data synth) carry a difficulty level: reported like a subject
        level = row.get("level")
        item = EvalItem(item_id, final, {"question": question.strip(), "solution": answer},
                        subject=f"level{level}" if level is not None else "")
        _dedupe(loaded, item, location, row, seen)
    return loaded


# --- MBPP --------------------------------------------------------------------------------

def load_mbpp(path: str | os.PathLike) -> Loaded:
    """Both MBPP layouts: the full `mbpp.jsonl` and the hand-verified `sanitized-mbpp.json`."""
    loaded, seen = Loaded(), set()
    for location, row in iter_source_rows(path):
        if isinstance(row, Exception):
            _reject(loaded, location, {}, str(row))
            continue
        text = row.get("text", row.get("prompt"))
        tests = row.get("test_list")
        task_id = row.get("task_id")
        if not isinstance(text, str) or not text.strip():
            _reject(loaded, location, row, "missing task description ('text' or 'prompt')")
            continue
        if task_id is None:
            _reject(loaded, location, row, "missing field 'task_id'")
            continue
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            _reject(loaded, location, row, "field 'test_list' must be a non-empty list of strings", str(task_id))
            continue
        imports = row.get("test_imports") or []
        if not isinstance(imports, list):
            _reject(loaded, location, row, "field 'test_imports' must be a list", str(task_id))
            continue
        item = EvalItem(
            f"mbpp/{task_id}",
            str(row.get("code") or ""),
            {
                "task_id": int(task_id) if str(task_id).isdigit() else task_id,
                "text": text.strip(),
                "test_list": tests,
                "test_setup_code": row.get("test_setup_code") or "",
                "test_imports": imports,
            },
        )
        _dedupe(loaded, item, location, row, seen)
    return loaded


# The splits of Austin et al. 2021 (the MBPP README): ids 1-10 few-shot prompts, 11-510 test,
# 511-600 validation, 601-974 train. The sanitized set inherits them.
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}


def mbpp_split(items: list[EvalItem], split: str) -> list[EvalItem]:
    if split == "all":
        return list(items)
    if split not in MBPP_SPLITS:
        raise DataError(f"MBPP split {split!r}: expected one of {sorted(MBPP_SPLITS) + ['all']}")
    low, high = MBPP_SPLITS[split]
    return [i for i in items if isinstance(i.fields["task_id"], int) and low <= i.fields["task_id"] <= high]


# --- HumanEval ---------------------------------------------------------------------------

def load_humaneval(path: str | os.PathLike) -> Loaded:
    loaded, seen = Loaded(), set()
    for location, row in iter_source_rows(path):
        if isinstance(row, Exception):
            _reject(loaded, location, {}, str(row))
            continue
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(row.get(k), str) or not row[k]]
        if missing:
            _reject(loaded, location, row, f"missing field(s) {', '.join(repr(m) for m in missing)}",
                    row.get("task_id") if isinstance(row.get("task_id"), str) else None)
            continue
        item = EvalItem(
            row["task_id"],
            row.get("canonical_solution") or "",
            {"prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"]},
        )
        _dedupe(loaded, item, location, row, seen)
    return loaded


# --- MMLU --------------------------------------------------------------------------------

def _csv_rows(path: Path) -> Iterator[tuple[str, list[str] | Exception]]:
    """(file:line, row) with the line where each record starts; fields may span lines."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        start = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield f"{path}:{start}", DataError(f"invalid CSV: {error}")
                start = reader.line_num + 1
                continue
            yield f"{path}:{start}", row
            start = reader.line_num + 1


def mmlu_files(path: str | os.PathLike, split: str = "test", subjects: tuple[str, ...] | list[str] | None = None) -> list[Path]:
    """The CSV files for `subjects` under `path` (a file, a split dir, or the MMLU root)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_file():
        return [p]
    if (p / split).is_dir():
        p = p / split
    wanted = list(subjects) if subjects else list(MMLU_MATH_SUBJECTS)
    files, missing = [], []
    for subject in wanted:
        candidate = p / f"{subject}_{split}.csv"
        (files if candidate.is_file() else missing).append(candidate)
    if missing:
        raise DataError(f"{p}: missing MMLU file(s): {', '.join(m.name for m in missing)}")
    return files


def mmlu_subject(path: Path) -> str:
    return re.sub(r"_(test|dev|val)$", "", path.stem)


def load_mmlu(path: str | os.PathLike, split: str = "test", subjects: tuple[str, ...] | list[str] | None = None) -> Loaded:
    loaded, seen = Loaded(), set()
    for file in mmlu_files(path, split, subjects):
        subject = mmlu_subject(file)
        for index, (location, row) in enumerate(_csv_rows(file)):
            if isinstance(row, Exception):
                _reject(loaded, location, {}, str(row))
                continue
            record = dict(zip(("question", "A", "B", "C", "D", "answer"), row))
            if len(row) != 6:
                _reject(loaded, location, record, f"expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
                continue
            answer = row[5].strip().upper()
            if answer not in LETTERS:
                _reject(loaded, location, record, f"answer must be one of A, B, C, D, got {row[5]!r}")
                continue
            if not row[0].strip():
                _reject(loaded, location, record, "empty question")
                continue
            item = EvalItem(
                f"{subject}/{index}",
                answer,
                {"question": row[0].strip(), "choices": [c.strip() for c in row[1:5]]},
                subject=subject,
            )
            _dedupe(loaded, item, location, record, seen)
    return loaded

