"""What the trajectory and feature jobs share: a value per example computed in batches (grouped by length,
returned in the examples' order), and shards computed in resumable parts (each finished chunk of a shard's
examples is written atomically as a part file next to the output, so that a killed job resumes where it
stopped; the shard file is written at the end)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from xmas.errors import XmasError
from xmas.io import damage_of, read_json, read_seal, read_table, write_json, write_parquet
from xmas.progress import StageStats, progress

log = logging.getLogger(__name__)


def batch_positions(lengths: list[int] | None, count: int, batch_size: int) -> list[np.ndarray]:
    """Positions of each batch: in order, or (given lengths) sorted by length so batches pad little.

    The sort is stable, so equal lengths keep source order and the grouping is deterministic.
    """
    order = np.arange(count) if lengths is None else np.argsort(np.asarray(lengths), kind="stable")
    return [order[start : start + batch_size] for start in range(0, count, batch_size)]


def run_batches(
    records: list[dict], batches: list[np.ndarray], compute: Callable[[list[dict]], np.ndarray]
) -> np.ndarray:
    """``compute`` on each batch of records, its rows put back at the records' positions."""
    values = None
    for positions in batches:
        rows = compute([records[i] for i in positions])
        if values is None:
            values = np.zeros((len(records), *rows.shape[1:]), dtype=np.float32)
        values[positions] = rows
    return values if values is not None else np.zeros((0,), dtype=np.float32)


def extract_chunk(signal, records: list[dict], batch_size: int, lengths: list[int] | None = None) -> np.ndarray:
    """The signal of every record, in the records' order whatever the batching (grouped by ``lengths``)."""
    return run_batches(records, batch_positions(lengths, len(records), batch_size), signal)


def fingerprint(model_path: Path, shard: pd.DataFrame, **computed) -> dict:
    """What the part files depend on (the model's files, the shard's uids, what is computed and how): a part
    written under another fingerprint is not reused."""
    files = [path for path in Path(model_path).iterdir() if path.is_file()]
    model_files = sorted((path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in files)
    uids = hashlib.sha256("\n".join(shard["uid"]).encode()).hexdigest()
    return {"model": str(model_path), "model_files": model_files, "uids": uids, **computed}


def reset_stale_parts(parts: Path, current: dict) -> None:
    """Part files written under another fingerprint, or under one that cannot be read, are discarded."""
    marker = parts / "fingerprint.json"
    if parts.exists() and recorded_fingerprint(marker) != json.loads(json.dumps(current)):
        shutil.rmtree(parts)
    if not parts.exists():
        parts.mkdir(parents=True)
        write_json(current, marker)


def recorded_fingerprint(marker: Path) -> dict | None:
    if not marker.exists():
        return None
    try:
        return read_json(marker)
    except XmasError as error:
        log.warning("%s; the part files beside it are computed again", error)
        return None


def reusable_part(path: Path) -> bool:
    """A part file is reused only when its seal vouches for it; a damaged one is computed again."""
    if not path.exists():
        return False
    damage = damage_of(path)
    if damage is None and read_seal(path) is not None:
        return True
    log.warning("%s; computing it again", damage.what if damage else f"{path} has no seal")
    path.unlink()
    return False


def write_in_parts(
    shard: pd.DataFrame,
    out: Path,
    current: dict,
    chunk_size: int,
    load: Callable[[], Callable[[pd.DataFrame], pa.Table]],
    empty: pa.Table,
    stats: StageStats,
    desc: str,
) -> None:
    """Write ``out``: the rows ``load()`` computes for each chunk of ``shard`` (``load`` runs only when a
    chunk is left to compute: it loads the model), the chunks a killed run finished under the same
    fingerprint ``current`` reused; ``empty``: the table of a shard without examples."""
    parts = out.with_name(out.name + ".parts")
    reset_stale_parts(parts, current)
    chunks = [shard.iloc[i : i + chunk_size] for i in range(0, len(shard), chunk_size)]
    todo = [(n, chunk) for n, chunk in enumerate(chunks) if not reusable_part(parts / f"part-{n:05d}.parquet")]
    stats.add("in", len(shard))
    stats.add("resumed_rows", len(shard) - sum(len(chunk) for _, chunk in todo))
    if todo:
        compute = load()
        for n, chunk in progress(todo, total=len(todo), desc=desc, unit="chunk"):
            write_parquet(compute(chunk), parts / f"part-{n:05d}.parquet")
            stats.add("computed_rows", len(chunk))
    tables = [read_table(parts / f"part-{n:05d}.parquet") for n in range(len(chunks))] or [empty]
    merged = pa.concat_tables(tables)
    write_parquet(merged, out)
    stats.add("out", merged.num_rows)
    shutil.rmtree(parts)
