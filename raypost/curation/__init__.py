"""Data construction guided by a larger model: each step is Dataset -> Dataset on Ray Data.

    dedup(ds, threshold=0.8, log=log)                 exact + MinHash-LSH near-duplicates
    diversify(ds, budget=500, embedder="minilm")      even sampling across k-means clusters
    verify(ds, kind="math")                           `verified`, `verify_reason` columns
    entropy_route(ds, model=student, ...)             difficulty by first-token entropy; targets
    select_responses(ds, candidates=[...])            best/worst of reference, teacher, student
                                                      (candidates: ResponseSource, as entropy_route's teacher)
    write_training_sets(ds, out_dir)                  TRL SFT / KTO / preference Parquet

Set-aside rows and each step's report go to the `CurationLog` passed as `log`.
`curate(ds, steps, output_dir=...)` runs configured steps and writes everything.
"""

from raypost.curation.accuracy import verify
from raypost.curation.dedup import dedup
from raypost.curation.diversity import diversify
from raypost.curation.entropy import entropy_route, score_entropy
from raypost.curation.pipeline import curate, load_rows
from raypost.curation.rows import CurationLog, dataset_from_rows, read_stage
from raypost.curation.selection import select_responses
from raypost.curation.sources import ResponseSource
from raypost.curation.writers import write_training_sets

__all__ = [
    "CurationLog", "ResponseSource", "curate", "dataset_from_rows", "dedup", "diversify",
    "entropy_route", "load_rows", "read_stage", "score_entropy", "select_responses", "verify", "write_training_sets",
]
