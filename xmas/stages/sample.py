"""Rule ``sample``: pick the subset for a budget and account for every source record.

The methods are declared in :mod:`xmas.methods`. A clustered method (``xmas``, ``loss``, ...) samples
balanced over its clusters, visiting groups from the smallest; inside an image cluster the most stable
examples win, or a seeded draw (``cluster-random``). Text-only records form one more group
(``text_only_share: cluster``, upstream's rule) or keep their share of the usable records while the
image clusters share the rest (``proportional``). ``random`` draws uniformly; ``full`` takes every
usable record (the reference a subset is measured against). All write the selected source records
unchanged, in source order, and a manifest with one row per source record.
"""

from __future__ import annotations

import argparse
import json
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from xmas.data.examples import TEXT_ONLY, read_examples
from xmas.data.sources import POSITION_COLUMNS, Source, as_source, stage_source
from xmas.errors import XmasError
from xmas.io import read_parquet, read_table, write_parquet
from xmas.methods import FEATURE_METHODS, METHODS, Method, method_named
from xmas.progress import StageStats, add_input_arguments, log
from xmas.selection import rule_of
from xmas.selection.vectors import METADATA, feature_matrix, read_matrix
from xmas.settings import add_settings, settings_of

MANIFEST_COLUMNS = ["uid", "index", "cluster", "stability", "selected", "reason"]


def budget_size(budget: str, n_valid: int) -> int:
    """round(b · N_valid), halves rounded up, computed in decimal so 0.5 × 11 is 6, not 5."""
    try:
        fraction = Decimal(budget)
    except InvalidOperation:
        raise XmasError(f"budget must be a fraction in (0, 1], got {budget!r}") from None
    if not Decimal(0) < fraction <= Decimal(1):
        raise XmasError(f"budget must be a fraction in (0, 1], got {budget!r}")
    return int((fraction * n_valid).to_integral_value(rounding=ROUND_HALF_UP))


def water_fill(sizes: dict[int, int], target: int) -> dict[int, int]:
    """Quotas per group: smallest group first, each taking min(size, remaining // groups left).

    Exact whenever the groups hold ``target`` examples in all: a group that takes less than its
    share is full, and every later group is at least as large.
    """
    quotas, remaining = {}, target
    order = sorted(sizes, key=lambda group: (sizes[group], group))
    for position, group in enumerate(order):
        quotas[group] = min(sizes[group], remaining // (len(order) - position))
        remaining -= quotas[group]
    return quotas


def seeded_draw(n: int, count: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))


def text_share(text: int, target: int, n_valid: int) -> int:
    """The text-only records' share of ``target`` (halves up), as they are of the usable records."""
    return min(text, (2 * target * text + n_valid) // (2 * n_valid))


def proportional_quotas(sizes: dict[int, int], target: int, n_valid: int) -> dict[int, int]:
    """Text-only records keep their share of the usable records (halves up); image clusters water-fill
    the rest, and whatever they cannot fill goes back to the text-only records."""
    images = {group: n for group, n in sizes.items() if group != TEXT_ONLY}
    text = text_share(sizes[TEXT_ONLY], target, n_valid)
    quotas = water_fill(images, target - text)
    return {**quotas, TEXT_ONLY: min(sizes[TEXT_ONLY], target - sum(quotas.values()))}


def xmas_select(valid: pd.DataFrame, target: int, seed: int, method: Method, settings) -> pd.DataFrame:
    """``valid``: uid, index, cluster, stability for usable records. Adds ``selected`` and ``reason``.

    The ``method``'s ``inside_clusters``: ``stability`` keeps a cluster's most stable examples (XMAS),
    ``random`` draws them (the cluster-random baseline). Its ``text_only_share``, else the setting's
    (``settings``: the sample stage's, with ``min_cluster_size``): ``cluster`` gives the text-only records one
    group's quota, ``proportional`` their share of the usable records.
    """
    inside_clusters, text_only_share = method.inside_clusters, method.text_only_share or settings.text_only_share
    valid = valid.sort_values("index").assign(selected=False, reason=None)
    sizes = valid.cluster.value_counts().to_dict()
    small = {c for c, n in sizes.items() if c != TEXT_ONLY and n < settings.min_cluster_size}
    valid.loc[valid.cluster.isin(small), "reason"] = "cluster_below_min_size"
    groups = {c: n for c, n in sizes.items() if c not in small}
    if text_only_share == "proportional" and TEXT_ONLY in groups:
        quotas = proportional_quotas(groups, target, len(valid))
    else:
        quotas = water_fill(groups, target)
    for group, quota in quotas.items():
        members = valid[valid.cluster == group]
        if group == TEXT_ONLY:
            chosen = members.index[seeded_draw(len(members), quota, seed)]
            valid.loc[members.index, "reason"] = "text_not_drawn"
        elif inside_clusters == "random":
            chosen = members.index[seeded_draw(len(members), quota, seed + 1 + int(group))]
            valid.loc[members.index, "reason"] = "cluster_quota_filled"
        else:
            chosen = members.sort_values(["stability", "index"], kind="stable").index[:quota]
            valid.loc[members.index, "reason"] = "cluster_quota_filled"
        valid.loc[chosen, ["selected", "reason"]] = [True, None]
    return valid


def feature_select(
    method: Method, valid: pd.DataFrame, inputs: FeatureInputs, target: int, seed: int, settings
) -> tuple[pd.DataFrame, dict]:
    """A feature method's rule (xmas/selection/<its feature>.py) on the image records, with what
    ``xmas cluster-features`` wrote (their features memory-mapped: the rule reads a cluster's at a time); the
    text-only records keep their share of the usable records, drawn at random (whatever the images cannot fill
    goes to them). Returns the decisions and the rule's stats."""
    valid = valid.sort_values("index").assign(selected=False, reason=None)
    table = read_table(inputs.clusters)
    table = table.filter(pc.not_equal(table.column("cluster"), TEXT_ONLY))
    features = read_matrix(inputs.features)
    if len(features) != table.num_rows:
        raise XmasError(
            f"{inputs.features} holds {len(features)} rows, {inputs.clusters} {table.num_rows} image records"
        )
    images, text = valid[valid.cluster != TEXT_ONLY], valid[valid.cluster == TEXT_ONLY]
    # the rule runs in the features' order; its rows map back to the usable records by uid
    at = pd.Index(images.uid).get_indexer(table.column("uid").to_pylist())
    if (at < 0).any() or len(at) != len(images):
        raise XmasError(f"{inputs.clusters} does not hold the usable image records of this run; cluster them again")
    labels = table.column("cluster").to_numpy()
    centres = feature_matrix(read_table(inputs.centroids), "centroid")
    metadata = json.loads(table.schema.metadata[METADATA.encode()])
    image_quota = min(len(images), target - text_share(len(text), target, len(valid)))
    choice = rule_of(method.features).choose(features, labels, centres, image_quota, metadata, settings)
    valid.loc[images.index[at], "reason"] = choice.reasons
    valid.loc[images.index[at[choice.chosen]], ["selected", "reason"]] = [True, None]
    drawn = text.index[seeded_draw(len(text), min(len(text), target - len(choice.chosen)), seed)]
    valid.loc[text.index, "reason"] = "text_not_drawn"
    valid.loc[drawn, ["selected", "reason"]] = [True, None]
    return valid, choice.stats


class FeatureInputs(NamedTuple):
    """What ``xmas cluster-features`` wrote for a feature method."""

    clusters: Path
    centroids: Path
    features: Path


def random_select(valid: pd.DataFrame, target: int, seed: int) -> pd.DataFrame:
    valid = valid.sort_values("index").assign(selected=False, reason="not_drawn")
    chosen = valid.index[seeded_draw(len(valid), target, seed)]
    valid.loc[chosen, ["selected", "reason"]] = [True, None]
    return valid


def select_all(valid: pd.DataFrame) -> pd.DataFrame:
    return valid.sort_values("index").assign(selected=True, reason=None)


def manifest_of(examples: pd.DataFrame, decided: pd.DataFrame) -> pd.DataFrame:
    """One row per source record: the decision for usable ones, ``excluded:<reason>`` for the rest."""
    excluded = examples[examples.status != "ok"]
    excluded = excluded[["uid", "index"]].assign(
        cluster=pd.NA, stability=np.nan, selected=False, reason="excluded:" + examples.loc[excluded.index, "reason"]
    )
    manifest = pd.concat([decided[MANIFEST_COLUMNS], excluded[MANIFEST_COLUMNS]], ignore_index=True)
    manifest = manifest.sort_values("index", ignore_index=True)
    return manifest.astype({"cluster": "Int32", "stability": "float64", "selected": "bool", "reason": "string"})


def check_accounting(manifest: pd.DataFrame, examples: pd.DataFrame) -> None:
    """Source records = selected + not selected + excluded, by uid; fail loudly otherwise.

    Every uid of ``examples`` is in the manifest exactly once, at its source index; records that
    prepare excluded carry ``excluded:<their reason>`` and are never selected; every other unselected
    record has a reason.
    """
    problems = []
    if manifest.uid.duplicated().any():
        problems.append(f"uids listed twice: {manifest.uid[manifest.uid.duplicated()].head().tolist()}")
    if set(manifest.uid) != set(examples.uid):
        lost = sorted(set(examples.uid) - set(manifest.uid))[:5]
        extra = sorted(set(manifest.uid) - set(examples.uid))[:5]
        problems.append(f"records missing from the manifest: {lost}; listed but not in the source: {extra}")
    listed = manifest[["uid", "index", "selected", "reason"]].rename(
        columns={"index": "listed_index", "reason": "listed_reason"}
    )
    joined = examples[["uid", "index", "status", "reason"]].merge(listed, on="uid")
    moved = joined.uid[joined["index"] != joined.listed_index]
    if len(moved):
        problems.append(f"records listed at another source index: {moved.head().tolist()}")
    expected = ["" if status == "ok" else f"excluded:{reason}" for status, reason in zip(joined.status, joined.reason)]
    marked = [r if isinstance(r, str) and r.startswith("excluded:") else "" for r in joined.listed_reason]
    mismatched = [uid for uid, want, got in zip(joined.uid, expected, marked) if want != got]
    if mismatched:
        problems.append(f"records whose exclusion differs from prepare's: {mismatched[:5]}")
    wrongly_selected = joined.uid[joined.selected & (joined.status != "ok")]
    if len(wrongly_selected):
        problems.append(f"excluded records selected: {wrongly_selected.head().tolist()}")
    unexplained = manifest.uid[~manifest.selected & manifest.reason.isna()]
    if len(unexplained):
        problems.append(f"unselected records without a reason: {unexplained.head().tolist()}")
    is_excluded = manifest.reason.fillna("").str.startswith("excluded:")
    selected, excluded = int(manifest.selected.sum()), int(is_excluded.sum())
    not_selected = int((~manifest.selected & ~is_excluded).sum())
    if selected + not_selected + excluded != len(examples):
        problems.append(
            f"{len(examples)} source records, but {selected} selected + {not_selected} not selected "
            f"+ {excluded} excluded"
        )
    if problems:
        raise XmasError("accounting failed: " + "; ".join(problems))


def sample(
    method_name: str,
    budget: str,
    examples_path: Path,
    clusters_path: Path | None,
    seed: int,
    stats: StageStats,
    settings,
    centroids: Path | None = None,
    features: Path | None = None,
) -> pd.DataFrame:
    """The manifest of ``method_name``'s subset for ``budget`` (``settings``: the sample stage's); ``centroids`` and
    ``features``: the feature methods' (from ``xmas cluster-features``)."""
    method = method_named(method_name)
    examples = read_parquet(examples_path)
    valid = examples.loc[examples.status == "ok", ["uid", "index"]]
    if clusters_path is not None:
        clusters = read_parquet(clusters_path, columns=["uid", "cluster", "stability"])
        valid = valid.merge(clusters, on="uid", how="left", validate="one_to_one")
    else:
        valid = valid.assign(cluster=pd.NA, stability=np.nan)
    target = budget_size(budget, len(valid))
    if method.signal is not None:
        if clusters_path is None:
            raise XmasError(f"method {method.name} needs --clusters (of its {method.signal} trajectories)")
        if valid.cluster.isna().any():
            raise XmasError(f"{clusters_path} has no cluster for {int(valid.cluster.isna().sum())} usable records")
        decided = xmas_select(valid, target, seed, method, settings)
    elif method.features is not None:
        if clusters_path is None or centroids is None or features is None:
            raise XmasError(
                f"method {method.name} needs --clusters, --centroids and --features (of `xmas cluster-features`)"
            )
        inputs = FeatureInputs(clusters_path, centroids, features)
        decided, found = feature_select(method, valid, inputs, target, seed, settings)
        for name, value in found.items():
            stats.set(name, value)
    elif method.every_record:
        if target != len(valid):
            raise XmasError(f"method {method.name} selects every usable record: its budget must be 1, got {budget!r}")
        decided = select_all(valid)
    else:
        decided = random_select(valid, target, seed)
    manifest = manifest_of(examples, decided)
    check_accounting(manifest, examples)
    selected = int(manifest.selected.sum())
    if selected != target:
        log.warning(
            "budget %s asks for %d records but only %d can be selected: %d usable records sit in clusters "
            "smaller than min_cluster_size=%d",
            budget,
            target,
            selected,
            int((manifest.reason == "cluster_below_min_size").sum()),
            settings.min_cluster_size,
        )
    stats.add("in", len(examples))
    stats.add("valid", len(valid))
    stats.add("target", target)
    stats.add("selected", selected)
    stats.add("out", selected)
    stats.add("not_selected", int((~manifest.selected).sum()) - int((examples.status != "ok").sum()))
    for reason, n in examples.reason.dropna().value_counts().sort_index().items():
        stats.exclude(reason, int(n))
    not_selected = manifest.reason[~manifest.reason.fillna("").str.startswith("excluded:") & manifest.reason.notna()]
    stats.set("not_selected_reasons", {str(k): int(v) for k, v in not_selected.value_counts().sort_index().items()})
    return manifest


def write_subset(source: Source | Path, examples: Path, manifest: pd.DataFrame, out: Path) -> int:
    """The selected records in source order, in the source's format (:meth:`Source.write_subset`: JSON
    records byte for byte, parquet rows whole); returns how many."""
    positions = read_examples(examples, ["uid", "index", *POSITION_COLUMNS])
    return as_source(source).write_subset(positions[positions.uid.isin(manifest.uid[manifest.selected])], out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        choices=tuple(METHODS),
        default="xmas",
        help="selection method (default xmas): "
        + "; ".join(f"{name}: {method.description}" for name, method in METHODS.items()).replace("%", "%%"),
    )
    parser.add_argument("--budget", required=True, help="fraction of the usable records to select, in (0, 1]")
    add_input_arguments(parser, "examples", "annotations")
    parser.add_argument(
        "--clusters",
        type=Path,
        help="clusters.parquet from `xmas cluster` (needed by the clustered methods: "
        + ", ".join(name for name, method in METHODS.items() if method.signal)
        + "), or from `xmas cluster-features` (by "
        + ", ".join(FEATURE_METHODS)
        + ")",
    )
    parser.add_argument("--centroids", type=Path, help="centroids.parquet from `xmas cluster-features`")
    parser.add_argument("--features", type=Path, help="features.npy from `xmas cluster-features`")
    parser.add_argument(
        "--out", required=True, type=Path, help="subset to write, in the source's format (.json, .jsonl or .parquet)"
    )
    parser.add_argument("--manifest", type=Path, help="manifest parquet (default: <out>.manifest.parquet)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random draws (random, cluster-random, the text-only records of xmas and loss)",
    )
    add_settings(parser, "sample")


def run(args: argparse.Namespace) -> None:
    stats = StageStats(f"sample {args.method} {args.budget}")
    settings = settings_of(args, "sample")
    source = stage_source(args.annotations, settings)
    if args.out.suffix != source.suffix:
        raise XmasError(f"--out {args.out}: a subset of {source.given} is written as {source.suffix}, its format")
    manifest = sample(
        args.method,
        args.budget,
        args.examples,
        args.clusters,
        args.seed,
        stats,
        settings,
        args.centroids,
        args.features,
    )
    written = write_subset(source, args.examples, manifest, args.out)
    selected = int(manifest.selected.sum())
    if written != selected:
        raise XmasError(f"accounting failed: {args.out} holds {written} records but the manifest selects {selected}")
    write_parquet(manifest, args.manifest or args.out.with_suffix(".manifest.parquet"))
    stats.finish(args.stats)
