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

from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from raypost import records, schema
from raypost.curation.rows import CurationLog, collect, column_names

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


def write_training_sets(dataset, output_dir: str | Path, *, formats: list[Format] = ("sft", "kto", "preference"),
                        sft_from: Literal["auto", "target", "best", "response"] = "auto",
                        kto_from: Literal["auto", "select", "verified"] = "auto",
                        log: CurationLog | None = None) -> dict[str, Any]:
    """Write `<output_dir>/sft`, `/kto`, `/preference` (as asked and as the columns allow); returns counts.

    Rows that cannot give an SFT example go to `log` with the reason; a missing KTO or
    preference example is counted (not every prompt has a pair).
    """
    log = log if log is not None else CurationLog()
    output_dir = Path(output_dir)
    names = set(column_names(dataset))
    rows = collect(dataset).to_pylist() if dataset.count() else []
    report: dict[str, Any] = {}
    if "sft" in formats:
        source = sft_from if sft_from != "auto" else next(
            (c for c in (schema.TARGET, schema.BEST, schema.RESPONSE) if c in names), schema.RESPONSE)
        written, skipped = sft_rows(rows, source)
        for row, reason in skipped:
            log.reject("write", row, reason)
        records.write_part(output_dir / "sft", written, SFT_SCHEMA)
        report["sft"] = {"rows": len(written), "from": source, "skipped": len(skipped), "dir": str(output_dir / "sft")}
    if "kto" in formats:
        source = kto_from if kto_from != "auto" else ("select" if schema.BEST in names else "verified")
        if source == "verified" and schema.VERIFIED not in names:
            report["kto"] = {"rows": 0, "from": source, "note": "no `verified` column: add a verify step before write"}
        else:
            written, skipped = kto_rows(rows, source)
            records.write_part(output_dir / "kto", written, KTO_SCHEMA)
            report["kto"] = {"rows": len(written), "from": source, "desirable": sum(r["label"] for r in written),
                             "undesirable": sum(not r["label"] for r in written), "skipped": len(skipped),
                             "dir": str(output_dir / "kto")}
    if "preference" in formats:
        if schema.BEST not in names:
            report["preference"] = {"rows": 0, "note": "no `best`/`worst` columns: add a select step before write"}
        else:
            written = preference_rows(rows)
            records.write_part(output_dir / "preference", written, PREFERENCE_SCHEMA)
            report["preference"] = {"rows": len(written), "without_pair": len(rows) - len(written),
                                    "dir": str(output_dir / "preference")}
    log.report("write", report)
    return report
