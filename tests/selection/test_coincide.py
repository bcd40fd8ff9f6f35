"""COINCIDE's rule (xmas.selection.coincide) against an independent reading of its authors' code: the same
quantities computed the slow, literal way, one pair and one candidate at a time."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from xmas.selection.coincide import allocate, greedy_mmd, kernel, select, transferability
from xmas.settings import default_of

TEMPERATURE = default_of("features.temperature")  # theirs, 0.1


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_transferability_is_the_mean_similarity_to_the_centroids_not_too_similar():
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(6, 4))
    centroids[5] = centroids[4] + 0.01  # 4 and 5 are more than 0.9 similar: neither counts for the other
    found = transferability(centroids)
    for i in range(6):
        others = [cosine(centroids[i], centroids[j]) for j in range(6) if j != i]
        counted = [s for s in others if s <= 0.9]
        assert found[i] == pytest.approx(sum(counted) / len(counted))
    assert cosine(centroids[4], centroids[5]) > 0.9


def mmd(gram: np.ndarray, picked: list[int]) -> float:
    n, m = len(gram), len(picked)
    whole = sum(gram[i, j] for i in range(n) for j in range(n)) / n**2
    inside = sum(gram[i, j] for i in picked for j in picked) / m**2
    cross = sum(gram[i, j] for i in range(n) for j in picked) / (n * m)
    return whole + inside - 2 * cross


def test_prototypes_are_picked_one_by_one_to_minimise_the_mmd():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(12, 3))
    gram = kernel(features)
    for i, j in itertools.product(range(12), repeat=2):
        assert gram[i, j] == pytest.approx(math.exp(-np.sum((features[i] - features[j]) ** 2) / 2))
    expected: list[int] = []
    for _ in range(5):
        candidates = [c for c in range(12) if c not in expected]
        expected.append(min(candidates, key=lambda c: (round(mmd(gram, [*expected, c]), 12), c)))
    assert greedy_mmd(gram, 5) == expected


def test_the_budget_is_shared_in_order_of_share_and_a_small_clusters_rest_goes_to_those_after_it():
    # equal scores: shares of a third; the clusters are visited last index first (argsort, reversed)
    assert allocate(np.zeros(3), np.array([10, 10, 1]), 9, TEMPERATURE).tolist() == [
        4,
        4,
        1,
    ]  # 1 of its 3, the rest carried
    assert allocate(np.zeros(3), np.array([1, 10, 10]), 9, TEMPERATURE).tolist() == [
        1,
        3,
        3,
    ]  # visited last: 2 are lost
    # unequal scores: softmax(score / 0.1) shares, each of what remains
    scores = np.array([0.3, 0.1, 0.2])
    shares = np.exp(scores / 0.1) / np.exp(scores / 0.1).sum()
    first = round(20 * shares[0])
    second = round((20 - first) * np.exp(0.2 / 0.1) / (np.exp(0.2 / 0.1) + np.exp(0.1 / 0.1)))
    assert allocate(scores, np.array([100, 100, 100]), 20, TEMPERATURE).tolist() == [first, 20 - first - second, second]


def test_select_takes_each_clusters_count_of_prototypes_in_order_of_share():
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(3, 8)) * 3
    clusters = np.repeat([0, 1, 2], [10, 6, 14])
    features = centers[clusters] + rng.normal(size=(30, 8)) * np.array([0.2, 1.0, 0.5])[clusters, None]
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    centroids = np.stack([features[clusters == c].mean(axis=0) for c in range(3)])
    language = np.arange(4, 8)  # the language halves: the last 4 columns
    chosen = select(features, clusters, centroids, language, 9, TEMPERATURE)
    # the literal reading: density, transferability on the language halves, shares, counts, prototypes
    density = [
        np.mean(
            [[math.exp(-np.sum((a - b) ** 2) / 2) for b in features[clusters == c]] for a in features[clusters == c]]
        )
        for c in range(3)
    ]
    score = transferability(centroids[:, language]) / np.array(density)
    counts = allocate(score, np.bincount(clusters), 9, TEMPERATURE)
    order = np.argsort(np.exp(score / 0.1) / np.exp(score / 0.1).sum())[::-1]
    expected = [
        np.flatnonzero(clusters == c)[greedy_mmd(kernel(features[clusters == c]), counts[c])]
        for c in order
        if counts[c]
    ]
    assert chosen.tolist() == np.concatenate(expected).tolist() and len(chosen) == 9
    assert len(set(chosen.tolist())) == 9
