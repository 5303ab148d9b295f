"""Accuracy checks as columns: `verified` (bool) and `verify_reason` (str).

A thin Ray Data wrapper over `raypost.verify` (math answer matching; code run in a sandbox).
Rows with nothing to check (no response, no reference) cannot be judged and are set aside.
"""

from __future__ import annotations

import time
from typing import Literal

import pyarrow as pa

from raypost import schema
from raypost.curation.rows import LIGHT_CPUS, CurationLog, batch_rows, rows_table, totals



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


def _verified(batch: pa.Table) -> pa.Array:
    return pa.compute.fill_null(batch.column(schema.VERIFIED), False)


def _passed(batch: pa.Table) -> pa.Table:
    return pa.table({"rows": [batch.num_rows], "passed": [int(pa.compute.sum(_verified(batch).cast(pa.int64())).as_py() or 0)]})


def verify(dataset, *, kind: Literal["math", "code"] = "math", response_field: str = "response",
           reference_field: str = "reference", drop_failed: bool = False, log: CurationLog | None = None):
    """Add `verified`/`verify_reason`; rows lacking a response or reference go to `log`.

    With drop_failed, rows that fail the check are set aside too (with the verifier's reason).
    """
    import pyarrow.compute  # noqa: F401

    log = log if log is not None else CurationLog()
    started = time.perf_counter()
    dataset = dataset.materialize()
    unusable = dataset.map_batches(
        lambda b: b.filter(pa.compute.invert(_checkable(b, response_field, reference_field))), batch_format="pyarrow",
        num_cpus=LIGHT_CPUS)

    def nothing_to_verify(row):
        missing = response_field if not (row.get(response_field) or "").strip() else reference_field
        return f"nothing to verify: empty {missing!r}"

    rows_unusable = log.reject_rows("verify", unusable, nothing_to_verify)
    usable = dataset.map_batches(lambda b: b.filter(_checkable(b, response_field, reference_field)),
                                 batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    checked = usable.map_batches(verify_batch, fn_kwargs=dict(kind=kind, response_field=response_field,
                                                              reference_field=reference_field),
                                 batch_format="pyarrow", batch_size=64).materialize()
    counted = totals(checked.map_batches(_passed, batch_format="pyarrow", batch_size=None, num_cpus=LIGHT_CPUS),
                     ["rows", "passed"])
    checked_rows, passed = counted["rows"], counted["passed"]
    if drop_failed and passed < checked_rows:
        failed = checked.map_batches(lambda b: b.filter(pa.compute.invert(_verified(b))), batch_format="pyarrow",
                                     num_cpus=LIGHT_CPUS)
        log.reject_rows("verify", failed, lambda row: f"failed verification: {row['verify_reason']}")
        checked = checked.map_batches(lambda b: b.filter(_verified(b)), batch_format="pyarrow",
                                      num_cpus=LIGHT_CPUS).materialize()
    log.report("verify", {
        "kind": kind,
        "rows_checked": checked_rows,
        "rows_verified": passed,
        "rows_failed": checked_rows - passed,
        "rows_unusable": rows_unusable,
        "pass_rate": round(passed / checked_rows, 4) if checked_rows else None,
        "seconds": round(time.perf_counter() - started, 3),
    })
    return checked
