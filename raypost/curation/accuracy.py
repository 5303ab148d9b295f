"""Accuracy checks as columns: `verified` (bool) and `verify_reason` (str).

A thin Ray Data wrapper over `raypost.verify` (math answer matching; code run in a sandbox).
Rows with nothing to check (no response, no reference) cannot be judged and are set aside.
"""

from __future__ import annotations

import time
from typing import Literal

import pyarrow as pa

from raypost import schema
from raypost.curation.rows import CurationLog, batch_rows, collect, rows_table



def verify_batch(batch: pa.Table, *, kind: str, response_field: str, reference_field: str) -> pa.Table:
    from raypost.verify import verify_rows

    rows = batch_rows(batch)
    checked = verify_rows(rows, kind=kind, response_field=response_field, reference_field=reference_field)
    return rows_table([dict(r) for r in checked], batch.schema, schema.VERIFY_COLUMNS)


def _checkable(batch: pa.Table, response_field: str, reference_field: str) -> pa.Array:
    def present(name: str) -> pa.Array:
        if name not in batch.column_names:
            return pa.array([False] * batch.num_rows)
        values = batch.column(name).to_pylist()
        return pa.array([isinstance(v, str) and bool(v.strip()) or (v is not None and not isinstance(v, str))
                         for v in values])

    return pa.compute.and_(present(response_field), present(reference_field))


def verify(dataset, *, kind: Literal["math", "code"] = "math", response_field: str = "response",
           reference_field: str = "reference", drop_failed: bool = False, log: CurationLog | None = None):
    """Add `verified`/`verify_reason`; rows lacking a response or reference go to `log`.

    With drop_failed, rows that fail the check are set aside too (with the verifier's reason).
    """
    import pyarrow.compute  # noqa: F401

    log = log if log is not None else CurationLog()
    started = time.perf_counter()
    dataset = dataset.materialize()
    unusable = collect(dataset.map_batches(
        lambda b: b.filter(pa.compute.invert(_checkable(b, response_field, reference_field))), batch_format="pyarrow"))
    for row in unusable.to_pylist():
        missing = response_field if not (row.get(response_field) or "").strip() else reference_field
        log.reject("verify", row, f"nothing to verify: empty {missing!r}")
    usable = dataset.map_batches(lambda b: b.filter(_checkable(b, response_field, reference_field)),
                                 batch_format="pyarrow")
    checked = usable.map_batches(verify_batch, fn_kwargs=dict(kind=kind, response_field=response_field,
                                                              reference_field=reference_field),
                                 batch_format="pyarrow", batch_size=64).materialize()
    flags = collect(checked, [schema.VERIFIED]).column(schema.VERIFIED).to_pylist()
    passed = sum(1 for f in flags if f)
    if drop_failed and passed < len(flags):
        for row in collect(checked.filter(lambda r: not r[schema.VERIFIED])).to_pylist():
            log.reject("verify", row, f"failed verification: {row['verify_reason']}")
        checked = checked.filter(lambda r: bool(r[schema.VERIFIED])).materialize()
    log.report("verify", {
        "kind": kind,
        "rows_checked": len(flags),
        "rows_verified": passed,
        "rows_failed": len(flags) - passed,
        "rows_unusable": unusable.num_rows,
        "pass_rate": round(passed / len(flags), 4) if flags else None,
        "seconds": round(time.perf_counter() - started, 3),
    })
    return checked
