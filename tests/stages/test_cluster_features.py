"""Rule cluster_features, and the subsets of the feature methods (COINCIDE, SemDeDup) that sample reads it
for: clusters of every usable record, the budget met, every record accounted for."""

from __future__ import annotations

import numpy as np
import pytest

from xmas.data.examples import TEXT_ONLY
from xmas.errors import XmasError
from xmas.io import read_parquet, write_parquet
from xmas.progress import StageStats
from xmas.selection.vectors import read_matrix, write_matrix
from xmas.settings import stage_defaults
from xmas.stages.cluster_features import cluster_features
from xmas.stages.sample import check_accounting, sample

SAMPLE = stage_defaults("sample")  # COINCIDE's temperature 0.1 among them


@pytest.mark.parametrize("method", ["coincide", "semdedup"])
def test_feature_methods_select_their_budget_and_account_for_every_record(
    method, small_examples, feature_shards, tmp_path
):
    settings = stage_defaults("cluster-features", coincide_clusters=6, semdedup_clusters=4)
    clusters, centroids, features = cluster_features(small_examples, feature_shards, method, settings, StageStats("t"))
    clusters_path, centroids_path = tmp_path / "clusters.parquet", tmp_path / "centroids.parquet"
    features_path = tmp_path / "features.npy"
    write_parquet(clusters, clusters_path)
    write_parquet(centroids, centroids_path)
    write_matrix(features, features_path)
    stored = read_matrix(features_path)
    assert isinstance(stored, np.memmap) and stored.dtype == np.float16  # the sample job reads it as it indexes
    assert len(stored) == (clusters.column("cluster").to_numpy() != TEXT_ONLY).sum()
    examples = read_parquet(small_examples)
    usable = examples[examples.status == "ok"]
    assert clusters.num_rows == len(usable) and centroids.num_rows == (6 if method == "coincide" else 4)
    labels = clusters.column("cluster").to_numpy()
    assert (labels == TEXT_ONLY).sum() == (~usable.has_image).sum() > 0
    stats = StageStats("t")
    manifest = sample(method, "0.3", small_examples, clusters_path, 0, stats, SAMPLE, centroids_path, features_path)
    check_accounting(manifest, examples)
    target = round(0.3 * len(usable))
    assert manifest.selected.sum() == target
    text = manifest.uid.isin(usable.uid[~usable.has_image])
    assert manifest.selected[text].sum() == round(target * text.sum() / len(usable))  # their share
    reasons = set(manifest.reason[~manifest.selected & manifest.uid.isin(usable.uid)])
    assert reasons <= {"cluster_quota_filled", "near_duplicate", "budget_filled", "text_not_drawn"}
    if method == "semdedup":
        assert 0.0 <= stats.extra["eps"] <= 1.0
    again = sample(
        method, "0.3", small_examples, clusters_path, 0, StageStats("t"), SAMPLE, centroids_path, features_path
    )
    assert again.equals(manifest)
    with pytest.raises(XmasError, match="needs --clusters, --centroids and --features"):
        sample(method, "0.3", small_examples, clusters_path, 0, StageStats("t"), SAMPLE)


def test_missing_features_are_named(small_examples, feature_shards):
    settings = stage_defaults("cluster-features", coincide_clusters=4)
    with pytest.raises(XmasError, match=r"do not hold each usable image record once: \d+ missing"):
        cluster_features(small_examples, feature_shards[:1], "coincide", settings, StageStats("t"))


def test_the_clusters_are_the_same_on_any_number_of_threads(small_examples, feature_shards):
    settings = stage_defaults("cluster-features", coincide_clusters=6)
    one, two = (
        cluster_features(small_examples, feature_shards, "coincide", settings, StageStats("t"), threads)
        for threads in (1, 2)
    )
    assert one[0].column("cluster").equals(two[0].column("cluster")) and one[1].equals(two[1])
