"""SemDeDup's rule (xmas.selection.semdedup) against an independent reading: each eps tried the way their
scripts try their hand-picked ones, one record at a time."""

from __future__ import annotations

import numpy as np

from xmas.selection.semdedup import select


def kept_with(embeddings, clusters, centroids, eps) -> list[int]:
    """Their rule, literally: per cluster (0, 1, ...) the rows farthest from the centroid first; a row is dropped
    when any row before it in its cluster is more similar than 1 - eps."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    centres = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    kept = []
    for cluster in range(len(centroids)):
        rows = sorted(np.flatnonzero(clusters == cluster), key=lambda row: -(1 - unit[row] @ centres[cluster]))
        for position, row in enumerate(rows):
            if not any(unit[row] @ unit[earlier] > 1 - eps for earlier in rows[:position]):
                kept.append(int(row))
    return kept


def test_near_duplicates_go_first_and_the_budget_takes_the_smallest_kept_set_that_holds_it():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(20, 16))
    copies = base[:8] + rng.normal(size=(8, 16)) * 0.05  # near-duplicates of 8 records
    embeddings = np.concatenate([base, copies])
    clusters = np.array([row % 3 for row in range(20)] + [row % 3 for row in range(8)])
    centroids = np.stack([embeddings[clusters == c].mean(axis=0) for c in range(3)])
    for budget in (10, 15, 20, 25):
        chosen, eps = select(embeddings, clusters, centroids, budget)
        # the kept set changes only where 1 - eps crosses the similarity of two records of a cluster
        unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        pairs = [unit[a] @ unit[b] for a in range(28) for b in range(28) if a < b and clusters[a] == clusters[b]]
        candidates = [kept_with(embeddings, clusters, centroids, 1 - s) for s in pairs if s > 0]
        enough = [kept for kept in candidates if len(kept) >= budget]
        closest = min(enough, key=len)
        assert chosen.tolist() == closest[:budget], budget
        assert len(kept_with(embeddings, clusters, centroids, eps - 1e-9)) >= budget
    chosen, _ = select(embeddings, clusters, centroids, 20)
    # with 20 of 28 kept, every planted copy or its original is gone: one of each near-duplicate pair stays
    assert all((row in chosen) != (row + 20 in chosen) for row in range(8))
