"""Rule ``merge``: the (checkpoint, shard) files into ``results/trajectories.parquet``, checking completeness.

Every usable image example must have exactly one row for every checkpoint 1..C; otherwise the
job fails and names the missing uids and the shard files they belong to.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import pyarrow as pa

from xmas.data.examples import shard_slice, usable_count, usable_image_examples
from xmas.errors import XmasError
from xmas.io import read_table, write_parquet
from xmas.progress import StageStats, add_input_arguments
from xmas.settings import add_settings, settings_of
from xmas.training.schedule import checkpoint_count

SHOWN = 10


def check_complete(table: pd.DataFrame, usable: pd.DataFrame, checkpoints: int, shards: int) -> None:
    shard_of = {uid: s for s in range(shards) for uid in shard_slice(usable, s, shards).uid}
    wanted = set(shard_of)
    problems = []
    duplicated = table[table.duplicated(["uid", "checkpoint"], keep=False)]
    if len(duplicated):
        problems.append(f"{len(duplicated)} duplicate (uid, checkpoint) rows, e.g. {duplicated.iloc[0].uid!r}")
    unknown = set(table.uid) - wanted
    if unknown:
        problems.append(f"{len(unknown)} uids that are not usable image examples, e.g. {sorted(unknown)[:SHOWN]}")
    for checkpoint in range(1, checkpoints + 1):
        missing = sorted(wanted - set(table.uid[table.checkpoint == checkpoint]))
        if missing:
            shard_numbers = sorted({shard_of[uid] for uid in missing})
            problems.append(
                f"checkpoint {checkpoint}: {len(missing)} examples missing (shards {shard_numbers}), "
                f"e.g. {missing[:SHOWN]}"
            )
    extra = sorted(set(table.checkpoint) - set(range(1, checkpoints + 1)))
    if extra:
        problems.append(f"rows for checkpoints outside 1..{checkpoints}: {extra}")
    if problems:
        raise XmasError("trajectories are incomplete: " + "; ".join(problems))


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
    merged = concat_shards(inputs)
    frame = merged.to_pandas()
    usable = usable_image_examples(examples)
    check_complete(frame, usable, checkpoints, shards)
    order = usable.set_index("uid")["index"]
    frame = frame.assign(_order=frame.uid.map(order)).sort_values(["_order", "checkpoint"]).drop(columns="_order")
    stats.add("in", merged.num_rows)
    stats.add("files", len(inputs))
    stats.add("examples", frame.uid.nunique())
    stats.add("out", len(frame))
    return pa.Table.from_pandas(frame, schema=merged.schema, preserve_index=False)


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
