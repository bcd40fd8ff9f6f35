"""Rule ``cluster_features``: a feature method's clusters (``results/<method>/selection/clusters.parquet``:
every usable record's cluster) and their centroids
(``centroids.parquet``), by spherical k-means of the L2-normalised features, as COINCIDE and SemDeDup
cluster theirs (faiss, ``spherical=True``), and the image records' features as one matrix
(``features.npy``, in the clusters' order), which the sample job memory-maps. Text-only records have no
feature: their cluster is the text-only group's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xmas.data.examples import TEXT_ONLY, read_examples
from xmas.errors import XmasError
from xmas.io import read_table, write_parquet
from xmas.methods import FEATURE_METHODS
from xmas.progress import StageStats, add_input_arguments, add_threads_argument, log
from xmas.selection.vectors import METADATA, feature_matrix, vector_column, write_matrix
from xmas.settings import add_settings, settings_of


def read_features(inputs: list[Path], uids: list[str], method: str) -> tuple[np.ndarray, dict]:
    """The ``method`` feature of every uid, in their order, from the shard files; every uid exactly once."""
    tables = [read_table(path) for path in inputs]
    merged = pa.concat_tables([table.select(["uid", method]) for table in tables])
    order = pc.fill_null(pc.index_in(merged.column("uid"), value_set=pa.array(uids, pa.string())), -1).to_numpy()
    counts = np.bincount(order[order >= 0], minlength=len(uids))
    if (order < 0).any() or (counts != 1).any():
        missing = [uids[i] for i in np.flatnonzero(counts == 0)[:5]]
        raise XmasError(
            f"the feature files {', '.join(map(str, inputs))} do not hold each usable image record once: "
            f"{int((counts == 0).sum())} missing (e.g. {missing}), {int((counts > 1).sum())} repeated, "
            f"{int((order < 0).sum())} rows of other records"
        )
    features = np.empty((len(uids), merged.schema.field(method).type.list_size), dtype=np.float32)
    features[order] = feature_matrix(merged, method)
    return features, json.loads(tables[0].schema.metadata[METADATA.encode()])


def spherical_kmeans(
    points: np.ndarray, k: int, iterations: int, seed: int, threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and (unit) centroids of spherical k-means of the L2-normalised ``points``, on ``threads`` threads
    (faiss's assignments and centroid sums come out the same on any number: tests/stages/test_cluster_features.py)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    unit = np.ascontiguousarray(points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12))
    model = faiss.Kmeans(
        unit.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1
    )
    model.train(unit)
    _, labels = model.index.search(unit, 1)
    return labels[:, 0].astype(np.int32), model.centroids.astype(np.float32)


def cluster_features(
    examples: Path, inputs: list[Path], method: str, settings, stats: StageStats, threads: int = 1
) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """(clusters, centroids, features) of ``method``'s features (``settings``: the cluster-features stage's):
    every usable record's cluster, the centroids, and the image records' features in the clusters' order."""
    table = read_examples(examples, ["uid", "index", "has_image", "status"])
    usable = table[table.status == "ok"].sort_values("index")
    images = usable[usable.has_image]
    features, metadata = read_features(inputs, images.uid.tolist(), method)
    asked = getattr(settings, f"{method}_clusters")
    k = max(1, min(asked, len(images)))
    if k < asked:
        log.warning("%s: %d clusters asked, but there are %d image records; using %d", method, asked, len(images), k)
    if len(images):
        labels, centroids = spherical_kmeans(features, k, settings.kmeans_iterations, settings.seed, threads)
    else:
        labels, centroids = np.zeros(0, np.int32), np.zeros((k, features.shape[1]), np.float32)
    cluster = np.full(len(usable), TEXT_ONLY, dtype=np.int32)
    cluster[usable.has_image.to_numpy()] = labels
    clusters = pa.table(
        {
            "uid": pa.array(usable.uid, pa.string()),
            "cluster": cluster,
            "stability": np.full(len(usable), np.nan),
        }  # fmt: skip
    ).replace_schema_metadata({METADATA: json.dumps({**metadata, "method": method})})
    centroid_table = pa.table(
        {"cluster": np.arange(k, dtype=np.int32),
         "centroid": vector_column(centroids, pa.float32())}
    )  # fmt: skip
    stats.add("in", len(table))
    stats.add("image_examples", len(images))
    stats.add("text_only", len(usable) - len(images))
    stats.add("out", len(usable))
    stats.clusters(labels, k)
    return clusters, centroid_table, features


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, help="feature shard files (results/features/shard-*.parquet)")
    parser.add_argument("--method", required=True, choices=FEATURE_METHODS, help="whose features and K")
    add_input_arguments(parser, "examples")
    parser.add_argument("--out", required=True, type=Path, help="clusters parquet to write")
    parser.add_argument("--centroids", required=True, type=Path, help="centroids parquet to write")
    parser.add_argument(
        "--features", required=True, type=Path, help="the image records' features to write, as the clusters order them"
    )
    add_threads_argument(parser)
    add_settings(parser, "cluster-features")


def run(args: argparse.Namespace) -> None:
    stats = StageStats(f"cluster-features {args.method}")
    settings = settings_of(args, "cluster-features")
    clusters, centroids, features = cluster_features(
        args.examples, args.inputs, args.method, settings, stats, args.threads or 1
    )
    write_matrix(features, args.features)
    write_parquet(centroids, args.centroids)
    write_parquet(clusters, args.out)
    stats.finish(args.stats)
