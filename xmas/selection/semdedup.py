"""SemDeDup (Abbas et al., 2023) as COINCIDE's authors run it on LLaVA-665k (``COINCIDE_cluster/tinyllava/eval/
score/SemDeDup/``: ``sort_clusters.py``, ``execute_semdedup.py``, ``extract_dedup_data.py``), on embeddings
already computed and clustered (spherical k-means on L2-normalised embeddings):

- each cluster's records sorted farthest from the centroid first (``keep_hard``: by ``1 - cos(x, centroid)``);
- a record is a near-duplicate when an earlier record of its cluster is more similar to it than ``1 - eps``
  (whether or not that one was kept: a one-shot test), so each group of near-duplicates keeps its first;
- the subset: the records kept with the ``eps`` whose kept set is the smallest at least the budget, in
  cluster order (0, 1, ...) and sorted order inside each, cut to the budget.

Their scripts try a few ``eps`` picked by hand for each budget; here the ``eps`` is the one that rule would
pick among all, found exactly from the records' similarities.
"""

from __future__ import annotations

import numpy as np

from xmas.selection import Choice


def unit(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def sorted_clusters(embeddings: np.ndarray, clusters: np.ndarray, centroids: np.ndarray) -> list[np.ndarray]:
    """Each cluster's rows (cluster 0 first), farthest from its centroid first (ties: the lower row). The
    embeddings are read a cluster at a time (they may be memory-mapped)."""
    centroids = unit(centroids)
    order = []
    for cluster in range(len(centroids)):
        rows = np.flatnonzero(clusters == cluster)
        distance = 1.0 - unit(embeddings[rows]) @ centroids[cluster]
        order.append(rows[np.argsort(-distance, kind="stable")])
    return order


def earlier_similarity(embeddings: np.ndarray) -> np.ndarray:
    """For each row (in order), its largest cosine similarity to a row before it; 0 for the first, and never
    below 0 (as their upper-triangle maximum reads it)."""
    if len(embeddings) == 0:
        return np.zeros(0)
    rows = unit(embeddings)
    upper = np.triu(rows @ rows.T, k=1)
    return upper.max(axis=0)


def select(
    embeddings: np.ndarray, clusters: np.ndarray, centroids: np.ndarray, budget: int
) -> tuple[np.ndarray, float]:
    """The rows SemDeDup keeps for ``budget`` records, in its order, and the ``eps`` it kept them with."""
    kept, eps = kept_for(embeddings, clusters, centroids, budget)
    return kept[:budget], eps


def kept_for(
    embeddings: np.ndarray, clusters: np.ndarray, centroids: np.ndarray, budget: int
) -> tuple[np.ndarray, float]:
    """Every row SemDeDup keeps (not a near-duplicate) with the ``eps`` its rule picks for ``budget``, in its
    order (at least ``budget`` of them), and that ``eps``."""
    order = sorted_clusters(embeddings, clusters, centroids)
    rows = np.concatenate(order) if order else np.zeros(0, dtype=int)
    similarity = np.concatenate([earlier_similarity(embeddings[cluster]) for cluster in order]) if order else rows
    if budget <= 0:
        return rows[:0], 1.0
    if budget > len(rows):
        raise ValueError(f"a budget of {budget} records from {len(rows)}")
    # kept with eps: similarity <= 1 - eps; the smallest kept set of at least `budget` keeps up to the
    # budget-th smallest similarity
    threshold = np.sort(similarity)[budget - 1]
    return rows[similarity <= threshold], float(1.0 - threshold)


def choose(
    features: np.ndarray, clusters: np.ndarray, centroids: np.ndarray, budget: int, metadata: dict, settings
) -> Choice:
    """:func:`select` as the sample stage calls it: a record not chosen is a near-duplicate, or was kept by the
    rule's eps and cut by the budget."""
    kept, eps = kept_for(features, clusters, centroids, budget)
    reasons = np.full(len(features), "near_duplicate", dtype=object)
    reasons[kept] = "budget_filled"
    return Choice(kept[:budget], reasons, {"eps": eps})
