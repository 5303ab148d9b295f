"""Exact and near-duplicate removal across the whole dataset.

Signatures (normalized-text hash, MinHash over shingles) are computed in parallel with
`map_batches`; the decisions need the whole dataset, so one global pass walks units in id
order and asks a MinHash LSH index (datasketch) for earlier kept units that look alike. That pass
runs as one task on a worker, not on the driver: it holds a unit key, a 16-byte hash and
`num_perm` × 8 bytes of signature per unit (about 1.1 GB per million units at 128
permutations), and only the duplicates' keys come back. Removed rows are committed by the
workers. Each lookup touches only its LSH buckets, so the pass is sub-quadratic; a candidate is
confirmed by its estimated Jaccard similarity before a row is called a duplicate. The first
unit by id is kept; later ones go to `rejected` as "duplicate of <id>".

A unit is a prompt id (all samples of a prompt stand or fall together) when deduplicating
prompts, or an (id, sample) pair when deduplicating responses.
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from raypost import schema
from raypost.curation.rows import LIGHT_CPUS, CurationLog, batch_rows, natural_key, prompt_text

_SPACE = re.compile(r"\s+")
# sentence punctuation only: "5 + 3" and "5 - 3" must stay different prompts
_PUNCT = re.compile(r"[.,!?;:'\"“”‘’]+")


def normalize_text(text: str) -> str:
    """Case, Unicode forms, sentence punctuation and spacing do not make two texts different."""
    text = unicodedata.normalize("NFKC", text or "").lower()
    text = _PUNCT.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def shingles(text: str, kind: Literal["char", "word"] = "char", size: int = 5) -> set[bytes]:
    if kind == "word":
        words = text.split()
        grams = [" ".join(words[i : i + size]) for i in range(max(1, len(words) - size + 1))]
    else:
        grams = [text[i : i + size] for i in range(max(1, len(text) - size + 1))]
    return {g.encode("utf-8") for g in grams if g}


def unit_key(row: dict, field: str) -> str:
    if field == "prompt":
        return str(row[schema.ID])
    return f"{row[schema.ID]}#{row.get(schema.SAMPLE_INDEX) or 0}"


def unit_text(row: dict, field: str) -> str:
    return prompt_text(row.get(schema.MESSAGES)) if field == "prompt" else (row.get(schema.RESPONSE) or "")


def signature_batch(batch, *, field: str, num_perm: int, shingle: str, shingle_size: int) -> pa.Table:
    """Ray Data batch function: (unit key, exact hash, MinHash signature) per row."""
    from datasketch import MinHash

    rows = batch_rows(batch)
    texts = [normalize_text(unit_text(r, field)) for r in rows]
    # bulk() shares one set of permutations across the batch instead of one per document;
    # num_perm 0: exact dedup only, no signatures
    minhashes = MinHash.bulk([shingles(t, shingle, shingle_size) for t in texts], num_perm=num_perm, seed=1) \
        if num_perm else [None] * len(rows)
    return pa.table({
            "unit": [unit_key(r, field) for r in rows],
            "id": [str(r[schema.ID]) for r in rows],
            "exact_hash": [hashlib.blake2b(t.encode("utf-8"), digest_size=16).hexdigest() for t in texts],
            "signature": pa.array([[] if m is None else m.hashvalues.astype(np.uint64) for m in minhashes],
                                  type=pa.list_(pa.uint64())),
        })


def find_duplicates(units: list[str], hashes: list[str], signatures: np.ndarray, *, threshold: float, exact: bool = True,
                    near: bool = True, num_perm: int = 128) -> dict[str, tuple[str, str]]:
    """unit -> (the earlier kept unit it duplicates, "exact" or "near"), visiting units in id order."""
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    scheme = MinHash(num_perm=num_perm, seed=1).scheme  # the scheme signature_batch's MinHash.bulk used

    order = sorted(range(len(units)), key=lambda i: natural_key(units[i]))
    first_by_hash: dict[str, str] = {}
    duplicate_of: dict[str, tuple[str, str]] = {}
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm) if near else None
    kept_signature: dict[str, np.ndarray] = {}
    for i in order:
        unit = units[i]
        if exact:
            earlier = first_by_hash.get(hashes[i])
            if earlier is not None:
                duplicate_of[unit] = (earlier, "exact")
                continue
            first_by_hash[hashes[i]] = unit
        if lsh is None:
            continue
        signature = signatures[i]
        minhash = LeanMinHash(seed=1, hashvalues=signature, scheme=scheme)
        matches = [c for c in lsh.query(minhash) if float(np.mean(kept_signature[c] == signature)) >= threshold]
        if matches:
            duplicate_of[unit] = (min(matches, key=natural_key), "near")
            continue
        lsh.insert(unit, minhash)
        kept_signature[unit] = signature
    return duplicate_of


def _decide(settings: dict, *tables: pa.Table) -> dict:
    """The global pass, in one task on a worker: the signature tables in, the duplicates out."""
    started = time.perf_counter()
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return {"duplicate_of": {}, "rows": 0, "units": 0, "seconds": 0.0}
    table = pa.concat_tables(tables)
    num_perm = settings["num_perm"]
    # several rows of one unit (samples of a prompt): the unit's first row speaks for it
    units, hashes, signature_rows, seen = [], [], [], set()
    unit_column = table.column("unit").to_pylist()
    hash_column = table.column("exact_hash").to_pylist()
    width = num_perm if settings["near"] else 0
    all_signatures = table.column("signature").combine_chunks().flatten().to_numpy(zero_copy_only=False) \
        .astype(np.uint64).reshape(len(unit_column), width)
    for i, unit in enumerate(unit_column):
        if unit in seen:
            continue
        seen.add(unit)
        units.append(unit)
        hashes.append(hash_column[i])
        signature_rows.append(i)
    duplicate_of = find_duplicates(units, hashes, all_signatures[signature_rows], threshold=settings["threshold"],
                                   exact=settings["exact"], near=settings["near"], num_perm=num_perm)
    return {"duplicate_of": duplicate_of, "rows": len(unit_column), "units": len(units),
            "seconds": round(time.perf_counter() - started, 3)}


def dedup(dataset, *, field: Literal["prompt", "response"] = "prompt", exact: bool = True, near: bool = True,
          threshold: float = 0.8, num_perm: int = 128, shingle: Literal["char", "word"] = "char",
          shingle_size: int = 5, log: CurationLog | None = None):
    """Drop exact and near-duplicate prompts (or responses); keep the first by id.

    Returns the kept rows as a Dataset; removed rows go to `log` with "duplicate of <id>".
    """
    import ray

    log = log if log is not None else CurationLog()
    started = time.perf_counter()
    dataset = dataset.materialize()  # read once: signatures, the kept rows and the removed rows
    columns = [schema.ID, schema.MESSAGES] if field == "prompt" else [schema.ID, schema.SAMPLE_INDEX, schema.RESPONSE]
    signed = dataset.select_columns(columns).map_batches(signature_batch, fn_kwargs=dict(
        field=field, num_perm=num_perm if near else 0, shingle=shingle, shingle_size=shingle_size), batch_format="pyarrow",
        batch_size=1024)
    decide = ray.remote(_decide).options(num_cpus=LIGHT_CPUS)
    decision = ray.get(decide.remote(dict(threshold=threshold, exact=exact, near=near, num_perm=num_perm),
                                     *signed.to_arrow_refs()))
    duplicate_of = decision["duplicate_of"]
    exact_removed = sum(1 for _, how in duplicate_of.values() if how == "exact")

    def is_removed(batch: pa.Table) -> pa.Array:
        ids = batch.column(schema.ID).to_pylist()
        if field == "prompt":
            return pa.array([str(i) in duplicate_of for i in ids])
        samples = batch.column(schema.SAMPLE_INDEX).to_pylist() if schema.SAMPLE_INDEX in batch.column_names \
            else [0] * len(ids)
        return pa.array([f"{i}#{s or 0}" in duplicate_of for i, s in zip(ids, samples)])

    def why(row) -> str:
        earlier, how = duplicate_of[unit_key(row, field)]
        return f"duplicate of {earlier.split('#')[0]} ({how})"

    kept = dataset
    if duplicate_of:
        kept = dataset.map_batches(lambda b: b.filter(pa.compute.invert(is_removed(b))),
                                   batch_format="pyarrow", num_cpus=LIGHT_CPUS).materialize()
        log.reject_rows("dedup", dataset.map_batches(lambda b: b.filter(is_removed(b)), batch_format="pyarrow",
                                                     num_cpus=LIGHT_CPUS), why)
    rows_in = decision["rows"]
    log.report("dedup", {
        "field": field,
        "threshold": threshold,
        "rows_in": rows_in,
        "units_in": decision["units"],
        "units_removed": len(duplicate_of),
        "exact_units_removed": exact_removed,
        "near_units_removed": len(duplicate_of) - exact_removed,
        "rows_out": kept.count() if duplicate_of else rows_in,
        "lsh_seconds": decision["seconds"],
        "seconds": round(time.perf_counter() - started, 3),
    })
    return kept
