"""Stability and clustering of trajectories."""

from __future__ import annotations

import numpy as np
import pandas as pd

from xmas.io import write_parquet
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages.cluster import cluster, default_clusters, feature_of, stability


def test_stability_is_the_summed_absolute_change_over_checkpoints():
    values = np.array([[[1.0, 0.5], [3.0, 0.5], [2.0, 1.0]]])  # one example, 3 checkpoints, k=2
    assert stability(feature_of(values, "sum_topk")) == abs(3.5 - 1.5) + abs(3.0 - 3.5)
    assert stability(feature_of(values, "sv1")) == 2.0 + 1.0
    assert stability(feature_of(values, "all")) == 2.0 + 1.0 + 0.5


def test_default_cluster_count():
    assert default_clusters(2232) == 47 and default_clusters(665_000) == 815 and default_clusters(10**8) == 1000
    assert default_clusters(1) == 1


def synthetic_inputs(tmp_path, groups=3, per_group=30, checkpoints=4):
    """Three well separated trajectory shapes, plus two text-only records and one excluded one."""
    rng = np.random.default_rng(0)
    uids, rows = [], []
    for g in range(groups):
        shape = rng.uniform(0, 10, checkpoints)
        for i in range(per_group):
            uid = f"g{g}-{i}"
            uids.append(uid)
            for c in range(checkpoints):
                value = shape[c] + rng.normal(0, 0.01)
                rows.append({"uid": uid, "checkpoint": c + 1, "sv1": value * 0.8, "sv2": value * 0.2})
    examples = pd.DataFrame(
        {
            "uid": uids + ["t0", "t1", "x"],
            "index": range(len(uids) + 3),
            "has_image": [True] * len(uids) + [False, False, True],
            "status": ["ok"] * (len(uids) + 2) + ["excluded"],
        }
    )
    write_parquet(examples, tmp_path / "examples.parquet")
    write_parquet(pd.DataFrame(rows), tmp_path / "trajectories.parquet")
    return tmp_path / "examples.parquet", tmp_path / "trajectories.parquet"


def test_clusters_recover_trajectory_shapes_and_are_reproducible(tmp_path):
    examples, trajectories = synthetic_inputs(tmp_path)
    settings = stage_defaults("cluster", clusters=3, kmeans_iterations=20, seed=0)
    result = cluster(examples, trajectories, settings, StageStats("t"))
    assert result.uid.tolist()[-2:] == ["t0", "t1"] and "x" not in set(result.uid)
    assert (result.cluster.iloc[-2:] == -1).all() and result.stability.iloc[-2:].isna().all()
    images = result.iloc[:-2]
    assert images.groupby(images.uid.str[:2]).cluster.nunique().eq(1).all()  # each shape in one cluster
    assert images.cluster.nunique() == 3
    again = cluster(examples, trajectories, settings, StageStats("t"))
    pd.testing.assert_frame_equal(result, again)


def test_more_clusters_than_the_examples_can_fill_are_capped(tmp_path, caplog):
    """The paper's K = 1000 on a small dataset would leave every cluster below min_cluster_size."""
    examples, trajectories = synthetic_inputs(tmp_path)  # 90 image examples
    settings = stage_defaults("cluster", clusters=1000, kmeans_iterations=20, seed=0)
    stats = StageStats("t")
    result = cluster(examples, trajectories, settings, stats)
    assert stats.as_dict()["clusters"] == 30 and result.cluster[result.cluster >= 0].nunique() <= 30
    assert "1000 asked, but 90 image examples fill at most 30 clusters" in caplog.text
