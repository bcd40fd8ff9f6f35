"""COINCIDE's rule (Lee et al., 2024), as its authors' code implements it (``COINCIDE_cluster/tinyllava/eval/
score/coincide/``: ``cluster_transferability.py``, ``cluster_wise_prune.py``), on features already computed
and clustered:

- a cluster's **transferability** ``T_c``: the mean cosine similarity of its centroid to every other centroid
  at most 0.9 similar, on the centroids' language halves (their code computes but never uses the k nearest
  centroids its ``--k`` names);
- its **density** ``D_c``: the mean Gaussian kernel ``exp(-||x - y||^2 / 2 sigma^2)`` over all pairs of its
  records (the diagonal included), sigma 1;
- the budget shared out by ``softmax(T_c / D_c / temperature)`` (temperature 0.1), cluster by cluster in
  descending share, each taking ``round(remaining * its share)`` of what is left (renormalised over the
  clusters not yet visited), a cluster too small for its share giving the rest to those after it;
- inside a cluster, prototypes picked greedily to minimise the (biased) squared MMD between the cluster and
  the picked set.
"""

from __future__ import annotations

import numpy as np

from xmas.selection import Choice

SIMILAR = 0.9  # centroids more similar than this do not count towards transferability
SIGMA = 1.0


def transferability(centroids: np.ndarray, similar: float = SIMILAR) -> np.ndarray:
    """``T_c`` of each centroid (rows): its mean cosine similarity to the centroids at most ``similar`` to it
    (itself never counts); 0 when every other centroid is more similar."""
    unit = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    cosine = unit @ unit.T
    counted = cosine <= similar
    np.fill_diagonal(counted, False)
    totals = np.where(counted, cosine, 0.0).sum(axis=1)
    return np.divide(totals, counted.sum(axis=1), out=np.zeros(len(cosine)), where=counted.any(axis=1))


def kernel(features: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """The Gaussian kernel between every pair of rows, in float64."""
    x = features.astype(np.float64)
    squared = (x * x).sum(axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2.0 * x @ x.T, 0.0)
    return np.exp(-distances / (2.0 * sigma**2))


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    scaled = scores / temperature
    weights = np.exp(scaled - scaled.max())
    return weights / weights.sum()


def visiting_order(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Clusters by descending share (as their code sorts: ``argsort`` reversed)."""
    return np.argsort(softmax(scores, temperature))[::-1]


def allocate(scores: np.ndarray, sizes: np.ndarray, budget: int, temperature: float) -> np.ndarray:
    """How many records each cluster gives: clusters visited in descending ``softmax(scores / temperature)``,
    each taking ``round(remaining * share)`` (at most its size), the shares renormalised over the clusters
    still to visit."""
    scores, sizes = np.asarray(scores, dtype=np.float64), np.asarray(sizes)
    order = visiting_order(scores, temperature)
    counts, remaining = np.zeros(len(scores), dtype=int), budget
    for position, cluster in enumerate(order):
        share = softmax(scores[order[position:]], temperature)[0]
        counts[cluster] = min(int(round(remaining * share)), int(sizes[cluster]))
        remaining -= counts[cluster]
    return counts


def greedy_mmd(gram: np.ndarray, count: int) -> list[int]:
    """``count`` rows of a cluster (its kernel matrix ``gram``), each step adding the one that minimises the
    squared MMD between the cluster and the rows picked so far; ties go to the lowest row."""
    picked: list[int] = []
    whole = gram.mean()
    to_all = gram.mean(axis=0)  # each row's mean kernel to the cluster
    within = 0.0  # sum of the kernel over the picked rows' pairs
    for step in range(min(count, len(gram))):
        candidates = np.setdiff1d(np.arange(len(gram)), picked)
        size = step + 1
        cross = (to_all[picked].sum() + to_all[candidates]) / size
        inside = (within + 2 * gram[np.ix_(candidates, picked)].sum(axis=1) + gram[candidates, candidates]) / size**2
        best = candidates[int(np.argmin(whole + inside - 2 * cross))]
        within += 2 * gram[best, picked].sum() + gram[best, best]
        picked.append(int(best))
    return picked


def select(
    features: np.ndarray,
    clusters: np.ndarray,
    centroids: np.ndarray,
    language: np.ndarray,
    budget: int,
    temperature: float,
    sigma: float = SIGMA,
) -> np.ndarray:
    """The rows COINCIDE selects: ``features`` of every record, ``clusters`` each record's cluster (0..K-1),
    ``centroids`` (K rows) and ``language`` the columns of the centroids' language halves (transferability
    reads those). Returns row indices in COINCIDE's order (clusters by share, prototypes in picking order)."""
    ids = np.arange(len(centroids))
    members = [np.flatnonzero(clusters == cluster) for cluster in ids]
    grams = [kernel(features[rows], sigma) if len(rows) else np.zeros((0, 0)) for rows in members]
    density = np.array([gram.mean() if gram.size else 1.0 for gram in grams])
    scores = transferability(centroids[:, language]) / density
    sizes = np.array([len(rows) for rows in members])
    counts = allocate(scores, sizes, budget, temperature)
    order = visiting_order(scores, temperature)
    chosen = [members[cluster][greedy_mmd(grams[cluster], counts[cluster])] for cluster in order if counts[cluster]]
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=int)


def choose(
    features: np.ndarray, clusters: np.ndarray, centroids: np.ndarray, budget: int, metadata: dict, settings
) -> Choice:
    """:func:`select` as the sample stage calls it (``settings``: its, with COINCIDE's temperature); the
    language halves are every second of the feature's ``coincide_parts`` pooled parts."""
    parts = metadata["coincide_parts"]
    width = features.shape[1] // parts
    language = np.concatenate([np.arange(part * width, (part + 1) * width) for part in range(1, parts, 2)])
    chosen = select(features, clusters, centroids, language, budget, settings.temperature)
    return Choice(chosen, np.full(len(features), "cluster_quota_filled", dtype=object), {})
