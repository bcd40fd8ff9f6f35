"""Rule ``cluster``: stability and k-means clusters of the trajectories (``results/selection/clusters.parquet``).

The trajectory of an example is its feature over checkpoints 1..C (default: the sum of its
top-k singular values; for the loss baseline, its loss); stability is Σ_t |x(t) − x(t−1)|,
lower meaning more stable.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from xmas.data.examples import TEXT_ONLY
from xmas.errors import XmasError
from xmas.io import read_parquet, write_parquet
from xmas.progress import StageStats, add_input_arguments, log
from xmas.settings import add_settings, settings_of

FEATURES = ("sum_topk", "sv1", "all")


def value_columns_of(trajectories: pd.DataFrame) -> list[str]:
    """``sv1``..``svK`` in order (attention trajectories) or ``loss`` (the loss baseline's)."""
    singular_values = sorted((c for c in trajectories.columns if re.fullmatch(r"sv\d+", c)), key=lambda c: int(c[2:]))
    if singular_values:
        return singular_values
    if "loss" in trajectories.columns:
        return ["loss"]
    raise XmasError(f"trajectories have no value columns (sv1..svK or loss): {', '.join(trajectories.columns)}")


def trajectory_tensor(trajectories: pd.DataFrame, uids: list[str]) -> np.ndarray:
    """(examples, checkpoints, k) array in the order of ``uids``: k singular values, or k = 1 loss."""
    value_columns = value_columns_of(trajectories)
    wide = trajectories.pivot(index="uid", columns="checkpoint", values=value_columns)
    missing = set(uids) - set(wide.index)
    if missing:
        raise XmasError(f"trajectories lack {len(missing)} usable image examples, e.g. {sorted(missing)[:5]}")
    wide = wide.loc[uids]
    array = np.stack([wide[column].to_numpy() for column in value_columns], axis=-1)  # (n, C, k)
    if np.isnan(array).any():
        raise XmasError("trajectories have gaps: some (example, checkpoint) pairs have no value")
    return array.astype(np.float32)


def feature_of(values: np.ndarray, feature: str) -> np.ndarray:
    """(examples, checkpoints, dims) feature per checkpoint."""
    if feature == "sum_topk":
        return values.sum(axis=2, keepdims=True)
    if feature == "sv1":
        return values[:, :, :1]
    if feature == "all":
        return values
    raise XmasError(f"feature must be one of {FEATURES}, got {feature!r}")


def stability(features: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(features.astype(np.float64), axis=1)).sum(axis=(1, 2))


def default_clusters(n: int) -> int:
    """About √n clusters, at most 1000 (the paper's K for LLaVA-665k)."""
    return max(1, min(1000, round(math.sqrt(n))))


def cluster_count(asked: str | int, examples: int, min_cluster_size: int) -> int:
    """K for k-means: as asked (or about √n for 'auto'), but no more than the examples can fill to
    ``min_cluster_size`` each, since sampling skips smaller clusters."""
    k = default_clusters(examples) if asked == "auto" else int(asked)
    fillable = max(1, examples // min_cluster_size)
    if k > fillable:
        log.warning(
            "clusters: %s asked, but %d image examples fill at most %d clusters of min_cluster_size %d "
            "(sampling skips smaller ones); using %d",
            asked,
            examples,
            fillable,
            min_cluster_size,
            fillable,
        )
    return min(k, fillable)


def kmeans(points: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
    import faiss

    faiss.omp_set_num_threads(1)  # one thread: the same input gives the same clusters, bit for bit
    points = np.ascontiguousarray(points, dtype=np.float32)
    model = faiss.Kmeans(points.shape[1], k, niter=iterations, seed=seed, verbose=False, min_points_per_centroid=1)
    model.train(points)
    _, labels = model.index.search(points, 1)
    return labels[:, 0].astype(np.int32)


def cluster(examples: Path, trajectories: Path, settings, stats: StageStats) -> pd.DataFrame:
    """The clusters and stability of every usable record (``settings``: the cluster stage's)."""
    table = read_parquet(examples, columns=["uid", "index", "has_image", "status"])
    usable = table[table.status == "ok"].sort_values("index")
    images = usable[usable.has_image]
    features = feature_of(trajectory_tensor(read_parquet(trajectories), list(images.uid)), settings.feature)
    k = cluster_count(settings.clusters, len(images), settings.min_cluster_size)
    points = features.reshape(len(images), -1)
    labels = kmeans(points, k, settings.kmeans_iterations, settings.seed) if len(images) else []
    result = usable[["uid"]].assign(cluster=np.int32(TEXT_ONLY), stability=np.nan)
    result.loc[usable.has_image.to_numpy(), "cluster"] = labels
    result.loc[usable.has_image.to_numpy(), "stability"] = stability(features)
    stats.add("in", len(table))
    stats.add("image_examples", len(images))
    stats.add("text_only", len(usable) - len(images))
    stats.add("out", len(result))
    stats.clusters(labels, k)
    return result.astype({"cluster": "int32", "stability": "float64"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser, "examples")
    parser.add_argument("--trajectories", required=True, type=Path, help="merged trajectories parquet")
    parser.add_argument("--out", required=True, type=Path, help="clusters parquet to write")
    add_settings(parser, "cluster")


def run(args: argparse.Namespace) -> None:
    if args.clusters != "auto" and not (args.clusters.isdigit() and int(args.clusters) > 0):
        raise XmasError(f"--clusters must be a positive integer or 'auto', got {args.clusters!r}")
    stats = StageStats("cluster")
    write_parquet(cluster(args.examples, args.trajectories, settings_of(args, "cluster"), stats), args.out)
    stats.finish(args.stats)
