"""Validate every source record and write ``results/data/examples.parquet``.

Nothing is dropped: a record that cannot be used stays in the table with ``status=excluded``
and a ``reason`` code, so the final manifest accounts for every source record.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
from pathlib import Path

import pandas as pd
from PIL import Image

from xmas.io import read_records, write_parquet
from xmas.records import InvalidRecord, check_conversation
from xmas.stage import StageStats, progress

COLUMNS = ["uid", "index", "has_image", "image", "source", "status", "reason", "detail"]


def unique_uids(records: list) -> list[str]:
    """The record's ``id`` where it is unique; later duplicates get ``#2``, ``#3``, ... (stable)."""
    used: set[str] = set()
    uids = []
    for index, record in enumerate(records):
        raw = record.get("id") if isinstance(record, dict) else None
        base = str(raw) if isinstance(raw, (str, int)) and str(raw) else f"record-{index}"
        uid, copy = base, 1
        while uid in used:
            copy += 1
            uid = f"{base}#{copy}"
        used.add(uid)
        uids.append(uid)
    return uids


def source_of(record: dict, image: str | None) -> str:
    """``source`` field if given, else the image's top folder (coco, gqa, ...), else ``text``."""
    if isinstance(record.get("source"), str) and record["source"]:
        return record["source"]
    if image is None:
        return "text"
    parts = Path(image).parts
    return parts[0] if len(parts) > 1 else "image"


def decode_error(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - any decoder failure means the image is unusable
        return f"{type(error).__name__}: {error}"
    return None


def validate(records: list, image_root: Path, max_images: int) -> pd.DataFrame:
    rows = []
    for index, (uid, record) in enumerate(zip(unique_uids(records), records)):
        row = {"uid": uid, "index": index, "has_image": False, "image": None, "source": None,
               "status": "ok", "reason": None, "detail": None}
        try:
            if not isinstance(record, dict):
                raise InvalidRecord("record_not_object", f"record is a {type(record).__name__}, not an object")
            paths = check_conversation(record, max_images)
            row["has_image"], row["image"] = bool(paths), (paths[0] if paths else None)
            row["source"] = source_of(record, row["image"])
            if paths and not (image_root / paths[0]).is_file():
                raise InvalidRecord("image_missing", f"{image_root / paths[0]} does not exist")
        except InvalidRecord as invalid:
            row.update(status="excluded", reason=invalid.reason, detail=invalid.detail)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def check_decodes(examples: pd.DataFrame, image_root: Path, workers: int) -> None:
    """Mark images that exist but do not decode, checking in parallel threads."""
    candidates = examples.index[(examples.status == "ok") & examples.has_image]
    paths = [image_root / examples.at[i, "image"] for i in candidates]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        errors = progress(pool.map(decode_error, paths), total=len(paths), desc="decode images", unit="img")
        for row, error in zip(candidates, errors):
            if error is not None:
                examples.loc[row, ["status", "reason", "detail"]] = ["excluded", "image_unreadable", error]


def prepare(annotations: Path, image_root: Path, max_images: int, check_images: bool, workers: int,
            stats: StageStats) -> pd.DataFrame:
    records = read_records(annotations)
    examples = validate(records, image_root, max_images)
    if check_images:
        check_decodes(examples, image_root, workers)
    stats.add("in", len(examples))
    ok = examples[examples.status == "ok"]
    stats.add("ok", len(ok))
    stats.add("ok_image", int(ok.has_image.sum()))
    stats.add("ok_text_only", int((~ok.has_image).sum()))
    for reason, n in examples.reason.value_counts().sort_index().items():
        stats.exclude(reason, int(n))
    return examples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, type=Path, help="LLaVA-format JSON list of records")
    parser.add_argument("--image-root", required=True, type=Path, help="folder the records' image paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="examples.parquet to write")
    parser.add_argument("--max-images", type=int, default=1, help="images per record the proxy supports (default 1)")
    parser.add_argument("--check-images", action=argparse.BooleanOptionalAction, default=True,
                        help="decode every image and exclude those that fail (default on)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads for image decoding")


def run(args: argparse.Namespace) -> None:
    stats = StageStats("prepare")
    examples = prepare(args.annotations, args.image_root, args.max_images, args.check_images, args.workers, stats)
    write_parquet(examples, args.out)
    stats.add("out", len(examples))
    stats.finish(args.stats)
