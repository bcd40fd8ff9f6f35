"""Rule ``merge``: the (checkpoint, shard) files into ``results/trajectories.parquet``, checking completeness.

Every usable image example must have exactly one row for every checkpoint 1..C; otherwise the
job fails and names the missing uids and the shard files they belong to.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from xmas.data.examples import shard_bounds, usable_count, usable_image_examples
from xmas.errors import XmasError
from xmas.io import read_table, write_parquet
from xmas.progress import StageStats, add_input_arguments
from xmas.settings import add_settings, settings_of
from xmas.training.schedule import checkpoint_count

SHOWN = 10


def check_complete(merged: pa.Table, order: np.ndarray, usable: pd.DataFrame, checkpoints: int, shards: int) -> None:
    """Every usable image example (``order``: each row's place among them, -1 for none) has exactly one row
    per checkpoint 1..C; else an error naming what is wrong, the missing examples with their shards."""
    problems = []
    checkpoint = checkpoints_of(merged)
    counted = (order >= 0) & (checkpoint >= 1) & (checkpoint <= checkpoints)
    places = order[counted] * checkpoints + checkpoint[counted] - 1
    rows = np.bincount(places, minlength=len(usable) * checkpoints).reshape(len(usable), checkpoints)
    repeated = np.flatnonzero((rows > 1).any(axis=1))
    if len(repeated):
        problems.append(
            f"{int(rows[rows > 1].sum())} duplicate (uid, checkpoint) rows, e.g. {usable.uid.iloc[repeated[0]]!r}"
        )
    unknown = pc.unique(merged.column("uid").filter(pa.array(order < 0))).to_pylist()
    if unknown:
        problems.append(f"{len(unknown)} uids that are not usable image examples, e.g. {sorted(unknown)[:SHOWN]}")
    shard_of = np.searchsorted(shard_bounds(len(usable), shards), np.arange(len(usable)), side="right") - 1
    for column in range(checkpoints):
        missing = np.flatnonzero(rows[:, column] == 0)
        if len(missing):
            shard_numbers = sorted(set(shard_of[missing].tolist()))
            names = sorted(usable.uid.iloc[missing].tolist())[:SHOWN]
            problems.append(
                f"checkpoint {column + 1}: {len(missing)} examples missing (shards {shard_numbers}), e.g. {names}"
            )
    extra = sorted(set(checkpoint[(checkpoint < 1) | (checkpoint > checkpoints)].tolist()))
    if extra:
        problems.append(f"rows for checkpoints outside 1..{checkpoints}: {extra}")
    if problems:
        raise XmasError("trajectories are incomplete: " + "; ".join(problems))


def checkpoints_of(merged: pa.Table) -> np.ndarray:
    return merged.column("checkpoint").to_numpy().astype(np.int64)


def concat_shards(inputs: list[Path]) -> pa.Table:
    """The shard files as one table. Their columns must agree; their metadata may not (an empty shard
    written by an older `xmas trajectory` has none), so the first non-empty one's is kept."""
    tables = [read_table(path) for path in inputs]
    columns = {path: table.schema.remove_metadata() for path, table in zip(inputs, tables)}
    if len(set(columns.values())) > 1:
        listed = "; ".join(f"{path}: {', '.join(schema.names)}" for path, schema in columns.items())
        raise XmasError(f"shard files disagree on columns (different trajectory.top_k or signal?): {listed}")
    reference = next((table for table in tables if table.num_rows), tables[0]).schema
    return pa.concat_tables([table.replace_schema_metadata(reference.metadata) for table in tables])


def merge(inputs: list[Path], examples: Path, checkpoints: int, shards: int, stats: StageStats) -> pa.Table:
    """The shard files' rows in source order, then checkpoint order; linear in the rows: each row's place
    is computed (its example's position x C + its checkpoint), not found by sorting."""
    merged = concat_shards(inputs)
    usable = usable_image_examples(examples)
    order = pc.index_in(merged.column("uid"), value_set=pa.array(usable.uid, pa.string()))
    order = pc.fill_null(order, -1).to_numpy().astype(np.int64)
    check_complete(merged, order, usable, checkpoints, shards)
    place = np.empty(merged.num_rows, dtype=np.int64)
    place[order * checkpoints + checkpoints_of(merged) - 1] = np.arange(merged.num_rows)
    stats.add("in", merged.num_rows)
    stats.add("files", len(inputs))
    stats.add("examples", len(usable))
    stats.add("out", merged.num_rows)
    return merged.take(pa.array(place))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", type=Path, help="shard files (results/trajectories/checkpoint-*/shard-*.parquet)"
    )
    add_input_arguments(parser, "examples")
    parser.add_argument("--out", required=True, type=Path, help="merged trajectories parquet")
    add_settings(parser, "merge")


def run(args: argparse.Namespace) -> None:
    stats = StageStats("merge")
    checkpoints = checkpoint_count(usable_count(args.examples), settings_of(args, "merge"))
    write_parquet(merge(args.inputs, args.examples, checkpoints, args.shards, stats), args.out)
    stats.finish(args.stats)
