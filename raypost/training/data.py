"""Training sets in TRL's formats, validated on the driver before any worker starts.

SFT: `messages` (a conversation) or `prompt` + `completion` (message lists or strings).
KTO: `prompt`, `completion`, `label` (bool: desirable or not).
DPO / ORPO: `prompt`, `chosen`, `rejected`.
PRM (TRL's stepwise supervision): `prompt`, `completions` (the steps, concatenated as given),
`labels` (one bool per step: the step is right).
Whole-set problems (missing column, empty set, non-boolean labels) raise `DatasetError` naming
the file and column; a single malformed row is set aside with its location and reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypost import console
from raypost.records import DataError, Rejected, iter_source_rows

REQUIRED_COLUMNS: dict[str, list[tuple[str, ...]]] = {
    # alternatives: the first column set that is fully present wins
    "sft": [("messages",), ("prompt", "completion")],
    "kto": [("prompt", "completion", "label")],
    "dpo": [("prompt", "chosen", "rejected")],
    "orpo": [("prompt", "chosen", "rejected")],
    "prm": [("prompt", "completions", "labels")],
}


class DatasetError(DataError):
    """A training set that cannot be used as a whole: the message names the file and column."""


@dataclass
class TrainingRows:
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    columns: tuple[str, ...] = ()
    source: str = ""


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"column {column!r}: expected a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(f"column {column!r}: message {i} needs string `role` and `content`")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _text_or_messages(value: Any, column: str) -> str | list[dict[str, str]]:
    if isinstance(value, str):
        if not value:
            raise ValueError(f"column {column!r}: empty string")
        return value
    return _messages(value, column)


def _normalize(row: dict[str, Any], columns: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column in columns:
        value = row.get(column)
        if value is None:
            raise ValueError(f"column {column!r}: missing value")
        if column == "label":
            out[column] = value
        elif column == "completions":
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"column {column!r}: expected a non-empty list of non-empty step strings")
            out[column] = list(value)
        elif column == "labels":
            if not isinstance(value, list) or not all(isinstance(v, bool) for v in value):
                raise ValueError(f"column {column!r}: expected a list of booleans, one per step")
            out[column] = list(value)
        elif column == "messages":
            out[column] = _messages(value, column)
        else:
            out[column] = _text_or_messages(value, column)
    if "labels" in out and len(out["labels"]) != len(out["completions"]):
        raise ValueError(f"{len(out['completions'])} steps but {len(out['labels'])} labels")
    # a set is either all conversational or all plain text: TRL applies the chat template per row
    kinds = {isinstance(out[c], list) for c in columns if c not in ("label", "completions", "labels")}
    if len(kinds) > 1:
        raise ValueError(f"columns {list(columns)} mix plain strings and message lists")
    return out


def _row_order(entry: tuple[str, dict[str, Any] | Exception]) -> tuple[int, str, str]:
    where, row = entry
    if isinstance(row, Exception):
        return 1, where, ""
    return 0, str(row.get("id", "")), json.dumps(row, sort_keys=True, default=str)


def resolve_dataset_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{p}: training set not found")
    return p


def load_training_rows(path: str | Path, method: str) -> TrainingRows:
    """Read and validate a training set for `method`. Raises DatasetError for whole-set problems."""
    p = resolve_dataset_path(path)
    raw: list[tuple[str, dict[str, Any] | Exception]] = list(iter_source_rows(p))
    if p.is_dir() and any(p.glob("*.parquet")):
        # parts written by Ray Data workers hold rows in whatever blocks the run made: train in one
        # order fixed by the rows themselves, so that a rerun on the same set is the same run
        raw.sort(key=_row_order)
    if not raw:
        raise DatasetError(f"{p}: empty training set (no rows)")
    parsed = [row for _, row in raw if isinstance(row, dict)]
    present = set().union(*(row.keys() for row in parsed)) if parsed else set()
    columns = next((alt for alt in REQUIRED_COLUMNS[method] if set(alt) <= present), None)
    if columns is None:
        wanted = " or ".join(repr(list(alt)) for alt in REQUIRED_COLUMNS[method])
        best = REQUIRED_COLUMNS[method][-1]
        missing = [c for c in best if c not in present]
        raise DatasetError(
            f"{p}: {method} data needs columns {wanted}; missing {missing} (found {sorted(present)})"
        )
    if "label" in columns:
        bad = [(where, row.get("label")) for where, row in raw if isinstance(row, dict) and not isinstance(row.get("label"), bool)]
        if bad:
            where, value = bad[0]
            raise DatasetError(
                f"{p}: column 'label' must be boolean (true = desirable); {len(bad)} row(s) are not, "
                f"first at {where}: {value!r}"
            )
    result = TrainingRows(columns=columns, source=str(p))
    for where, row in raw:
        if isinstance(row, Exception):
            result.rejected.append(Rejected(id=None, row={}, source=where, reason=str(row)))
            continue
        try:
            result.rows.append(_normalize(row, columns))
        except ValueError as error:
            result.rejected.append(Rejected(id=str(row.get("id")) if row.get("id") is not None else None, row=row, source=where, reason=str(error)))
    if not result.rows:
        first = result.rejected[0]
        raise DatasetError(f"{p}: no usable rows ({len(result.rejected)} rejected; first at {first.source}: {first.reason})")
    if method == "kto" and len({row["label"] for row in result.rows}) < 2:
        # TRL's KTO runs with one class, but the paper's loss then degenerates; say so early
        only = result.rows[0]["label"]
        console.say(f"warning: {p}: every KTO label is {only}; KTO learns most with both desirable and undesirable rows")
    return result
