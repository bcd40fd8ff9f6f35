"""``results/data/examples.parquet``, the table ``prepare`` writes: one row per source record, with
its status, its position in the source (:mod:`xmas.data.sources`) and its token count. What later stages read of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from xmas.data.sources import POSITION_COLUMNS, Source
from xmas.errors import XmasError
from xmas.io import read_parquet

# The cluster of text-only records in clusters.parquet: they have no trajectory.
TEXT_ONLY = -1


def read_examples(path: str | Path, columns: list[str]) -> pd.DataFrame:
    """Columns of ``examples.parquet``; they must be there (written by this version of ``prepare``)."""
    table = read_parquet(path)
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise XmasError(
            f"{path} has no column(s) {', '.join(missing)}: it was written by an older "
            "`xmas prepare`; run prepare again"
        )
    return table[columns]


def usable_records(examples: Path, source: Source):
    """The usable records (status ok) in source order, read from the source as they are used."""
    table = read_examples(examples, ["uid", "index", "status", *POSITION_COLUMNS])
    return source.reader(table[table.status == "ok"])


def usable_count(examples: Path) -> int:
    """How many records the proxy trains on (status ok)."""
    return int((read_examples(examples, ["status"]).status == "ok").sum())


def usable_image_examples(examples: Path) -> pd.DataFrame:
    """The usable records with an image, in source order: the ones with a trajectory."""
    table = read_examples(examples, ["uid", "index", "has_image", "status", "tokens", *POSITION_COLUMNS])
    return table[(table.status == "ok") & table.has_image].sort_values("index")


def shard_slice(usable: pd.DataFrame, shard: int, shards: int) -> pd.DataFrame:
    """Block ``shard`` of ``shards`` contiguous blocks of the usable image examples (source order)."""
    if not 0 <= shard < shards:
        raise XmasError(f"--shard must be in 0..{shards - 1}, got {shard}")
    bounds = shard_bounds(len(usable), shards)
    return usable.iloc[bounds[shard] : bounds[shard + 1]]


def shard_bounds(examples: int, shards: int) -> np.ndarray:
    """Where each of ``shards`` contiguous blocks of ``examples`` starts, and the end."""
    return np.linspace(0, examples, shards + 1).round().astype(int)
