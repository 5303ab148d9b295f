"""Training sets in TRL's conversational formats, as Parquet.

    sft/         prompt: [messages], completion: [{"role": "assistant", ...}]
    kto/         prompt, completion, label: bool (desirable or not)
    preference/  prompt, chosen: [assistant message], rejected: [assistant message]

Load with `datasets.load_dataset("parquet", data_files=f"{dir}/sft/*.parquet")`; TRL's
SFTTrainer, KTOTrainer and DPOTrainer (and ORPO) take them as they are.

Which text becomes the SFT completion (`sft_from`): auto picks `target` (entropy routing),
else `best` (selection), else a verified `response`. KTO rows come from selection's best/worst
pair, else from `response` labelled by `verified`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from raypost import records, schema
from raypost.curation.rows import CurationLog, column_names

CHAT = pa.list_(schema.MESSAGE_TYPE)
SFT_SCHEMA = pa.schema([("id", pa.string()), ("prompt", CHAT), ("completion", CHAT)])
KTO_SCHEMA = pa.schema([("id", pa.string()), ("prompt", CHAT), ("completion", CHAT), ("label", pa.bool_())])
PREFERENCE_SCHEMA = pa.schema([("id", pa.string()), ("prompt", CHAT), ("chosen", CHAT), ("rejected", CHAT)])

Format = Literal["sft", "kto", "preference"]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def sft_rows(rows: list[dict[str, Any]], sft_from: str) -> tuple[list[dict[str, Any]], list[tuple[dict, str]]]:
    out, skipped = [], []
    for row in rows:
        if sft_from == "response" and row.get(schema.VERIFIED) is False:
            skipped.append((row, "sft: response failed verification"))
            continue
        text = _text(row.get(sft_from))
        if text is None:
            skipped.append((row, f"sft: no {sft_from!r} text"))
            continue
        out.append({"id": str(row[schema.ID]), "prompt": row[schema.MESSAGES], "completion": assistant(text)})
    return out, skipped


def kto_rows(rows: list[dict[str, Any]], kto_from: str) -> tuple[list[dict[str, Any]], list[tuple[dict, str]]]:
    out, skipped = [], []
    for row in rows:
        prompt = row[schema.MESSAGES]
        if kto_from == "select":
            if _text(row.get(schema.BEST)):
                out.append({"id": str(row[schema.ID]), "prompt": prompt, "completion": assistant(row[schema.BEST]), "label": True})
            if _text(row.get(schema.WORST)):
                out.append({"id": str(row[schema.ID]), "prompt": prompt, "completion": assistant(row[schema.WORST]), "label": False})
            continue
        text = _text(row.get(schema.RESPONSE))
        if text is None or row.get(schema.VERIFIED) is None:
            skipped.append((row, "kto: no response or no verification label"))
            continue
        out.append({"id": str(row[schema.ID]), "prompt": prompt, "completion": assistant(text), "label": bool(row[schema.VERIFIED])})
    return out, skipped


def preference_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"id": str(r[schema.ID]), "prompt": r[schema.MESSAGES], "chosen": assistant(r[schema.BEST]), "rejected": assistant(r[schema.WORST])}
        for r in rows
        if _text(r.get(schema.BEST)) and _text(r.get(schema.WORST))
    ]


STAT_COLUMNS = ["rows", "sft", "sft_skipped", "kto", "desirable", "undesirable", "kto_skipped", "preference"]


def write_sets_batch(batch: pa.Table, *, output_dir: str, sft_from: str | None, kto_from: str | None,
                     preference: bool, rejected_dir: str | None) -> pa.Table:
    """Ray Data batch function: the batch's training examples committed as one part per set, named
    by their rows' keys. Rows that give no SFT example are committed as rejected rows when there
    is a `rejected_dir`, else returned (JSON) for the caller's log. One row of counts out."""
    from raypost.curation.rows import commit_rejected, part_keys
    from raypost.generation.batches import commit_part

    rows = batch.to_pylist()
    keys = part_keys(batch)
    stats = {c: 0 for c in STAT_COLUMNS}
    stats["rows"] = len(rows)
    skipped: list[tuple[dict, str]] = []
    if sft_from is not None:
        written, skipped = sft_rows(rows, sft_from)
        commit_part(Path(output_dir) / "sft", pa.Table.from_pylist(written, schema=SFT_SCHEMA), keys)
        stats["sft"], stats["sft_skipped"] = len(written), len(skipped)
    if kto_from is not None:
        written, kto_skipped = kto_rows(rows, kto_from)
        commit_part(Path(output_dir) / "kto", pa.Table.from_pylist(written, schema=KTO_SCHEMA), keys)
        stats.update(kto=len(written), desirable=sum(r["label"] for r in written),
                     undesirable=sum(not r["label"] for r in written), kto_skipped=len(kto_skipped))
    if preference:
        written = preference_rows(rows)
        commit_part(Path(output_dir) / "preference", pa.Table.from_pylist(written, schema=PREFERENCE_SCHEMA), keys)
        stats["preference"] = len(written)
    returned = []
    if skipped and rejected_dir is not None:
        table = pa.Table.from_pylist([{**row, "_reason": reason} for row, reason in skipped])
        commit_rejected(table, directory=rejected_dir, step="write", reason=lambda row: row.pop("_reason"))
    elif skipped:
        returned = [json.dumps({"row": row, "reason": reason}, default=str, ensure_ascii=False) for row, reason in skipped]
    return pa.table({**{c: [stats[c]] for c in STAT_COLUMNS}, "skipped": [returned]},
                    schema=pa.schema([*(pa.field(c, pa.int64()) for c in STAT_COLUMNS),
                                      pa.field("skipped", pa.list_(pa.string()))]))


def write_training_sets(dataset, output_dir: str | Path, *, formats: list[Format] = ("sft", "kto", "preference"),
                        sft_from: Literal["auto", "target", "best", "response"] = "auto",
                        kto_from: Literal["auto", "select", "verified"] = "auto",
                        log: CurationLog | None = None) -> dict[str, Any]:
    """Write `<output_dir>/sft`, `/kto`, `/preference` (as asked and as the columns allow); returns counts.

    The workers write the examples (a part per block and set); only counts come back. Rows that
    cannot give an SFT example go to `log` with the reason; a missing KTO or preference example
    is counted (not every prompt has a pair).
    """
    from raypost.curation.rows import LIGHT_CPUS

    log = log if log is not None else CurationLog()
    output_dir = Path(output_dir)
    names = set(column_names(dataset))
    report: dict[str, Any] = {}
    sft_source = kto_source = None
    if "sft" in formats:
        sft_source = sft_from if sft_from != "auto" else next(
            (c for c in (schema.TARGET, schema.BEST, schema.RESPONSE) if c in names), schema.RESPONSE)
    if "kto" in formats:
        kto_source = kto_from if kto_from != "auto" else ("select" if schema.BEST in names else "verified")
        if kto_source == "verified" and schema.VERIFIED not in names:
            report["kto"] = {"rows": 0, "from": kto_source, "note": "no `verified` column: add a verify step before write"}
            kto_source = None
    preference = "preference" in formats and schema.BEST in names
    if "preference" in formats and not preference:
        report["preference"] = {"rows": 0, "note": "no `best`/`worst` columns: add a select step before write"}
    stats = {c: 0 for c in STAT_COLUMNS}
    if sft_source is not None or kto_source is not None or preference:
        counts = dataset.map_batches(write_sets_batch, batch_format="pyarrow", num_cpus=LIGHT_CPUS, fn_kwargs=dict(
            output_dir=str(output_dir), sft_from=sft_source, kto_from=kto_source, preference=preference,
            rejected_dir=log.rejected_dir))
        for row in counts.iter_rows():
            for c in STAT_COLUMNS:
                stats[c] += int(row[c])
            for text in row["skipped"] or []:
                skipped = json.loads(text)
                log.reject("write", skipped["row"], skipped["reason"])
        if log.rejected_dir is not None and stats["sft_skipped"]:
            log.written["write"] = log.written.get("write", 0) + stats["sft_skipped"]
    if sft_source is not None:
        report["sft"] = {"rows": stats["sft"], "from": sft_source, "skipped": stats["sft_skipped"], "dir": str(output_dir / "sft")}
    if kto_source is not None:
        report["kto"] = {"rows": stats["kto"], "from": kto_source, "desirable": stats["desirable"],
                         "undesirable": stats["undesirable"], "skipped": stats["kto_skipped"], "dir": str(output_dir / "kto")}
    if preference:
        report["preference"] = {"rows": stats["preference"], "without_pair": stats["rows"] - stats["preference"],
                                "dir": str(output_dir / "preference")}
    log.report("write", report)
    return report
