"""Atomic file writes and the small readers every stage shares."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` on success.

    A killed process leaves at most a stray temp file, never a truncated target.
    Works for files and for directories.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / "tmp"
    try:
        yield tmp
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_parquet(frame: pd.DataFrame | pa.Table, path: str | Path) -> None:
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_records(records: list[dict], path: str | Path) -> None:
    """Write a LLaVA-format JSON list, one record per line (diffable, loadable by json.load)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("[\n")
        for position, record in enumerate(records):
            out.write(json.dumps(record, ensure_ascii=False))
            out.write(",\n" if position < len(records) - 1 else "\n")
        out.write("]\n")


def write_raw_records(raw_records: Iterable[bytes], path: str | Path) -> int:
    """Write a JSON list of records given as their exact source bytes, streamed; returns how many.

    The records are not re-encoded, so each one is byte for byte what the source file holds.
    """
    written = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(b"[\n")
        for raw in raw_records:
            if written:
                out.write(b",\n")
            out.write(raw)
            written += 1
        out.write(b"\n]\n")
    return written
