"""Rule ``prepare``: validate every source record and write ``results/data/examples.parquet``.

A record is ``ok`` when every later stage can encode it: its structure is valid, its image is a
readable file, and (counted with the proxy's tokenizer, chat template and image tokens, as
checkpoint 0 holds them) its image fits within ``max_length`` with text after it. Longer text
is cut at the end, as LLaVA does; ``tokens`` records each record's full length.

Nothing is dropped: a record that cannot be used stays in the table with ``status=excluded``
and a ``reason`` code, so the final manifest accounts for every source record. The annotation
file is streamed, one record at a time; each row keeps the record's byte ``offset`` and
``length`` in the file, so later stages can read single records without loading the file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from PIL import Image

from xmas.data.annotations import SourceRecords, iter_spans
from xmas.data.records import InvalidRecord, check_conversation, record_id
from xmas.io import write_parquet
from xmas.models.encoding import ConversationEncoder
from xmas.progress import StageStats, add_input_arguments, progress
from xmas.settings import add_settings

COLUMNS = ["uid", "index", "has_image", "image", "source", "status", "reason", "detail", "offset", "length"]
IMAGE_BATCH = 4096
TOKEN_BATCH = 1024


class UniqueIds:
    """The record's id where it is unique; later duplicates get ``#2``, ``#3``, ... (stable, in source order)."""

    def __init__(self):
        self.used: set[str] = set()
        self.next_copy: dict[str, int] = {}
        self.renamed = 0

    def __call__(self, record: object, index: int) -> str:
        base = record_id(record, index)
        uid, copy = base, self.next_copy.get(base, 1)
        if copy > 1:
            uid = f"{base}#{copy}"
        while uid in self.used:  # copies below next_copy are all taken, so each base is scanned once
            copy += 1
            uid = f"{base}#{copy}"
        self.next_copy[base] = copy
        self.used.add(uid)
        self.renamed += uid != base
        return uid


def unique_uids(records: Iterable) -> list[str]:
    assign = UniqueIds()
    return [assign(record, index) for index, record in enumerate(records)]


def source_of(record: dict, image: str | None) -> str:
    """``source`` field; else Vision-Flan's ``task_name``; else the image's top folder (coco, gqa, ...);
    else ``text``."""
    for field in ("source", "task_name"):
        if isinstance(record.get(field), str) and record[field]:
            return record[field]
    if image is None:
        return "text"
    parts = Path(image).parts
    return parts[0] if len(parts) > 1 else "image"


def check_record(record: object, max_images: int) -> dict:
    """The row fields that depend on the record alone; image files are checked later, in parallel."""
    row = {"has_image": False, "image": None, "source": None, "status": "ok", "reason": None, "detail": None}
    try:
        if not isinstance(record, dict):
            raise InvalidRecord("record_not_object", f"record is a {type(record).__name__}, not an object")
        paths = check_conversation(record, max_images)
        image = paths[0] if paths else None
        row.update(has_image=image is not None, image=image, source=source_of(record, image))
    except InvalidRecord as invalid:
        row.update(status="excluded", reason=invalid.reason, detail=invalid.detail)
    return row


def validate(annotations: Path, max_images: int) -> pd.DataFrame:
    """One row per record of the file, streamed: uid, index, structure checks, byte span."""
    columns: dict[str, list] = {name: [] for name in COLUMNS}
    assign = UniqueIds()
    for span in progress(iter_spans(annotations), desc="validate records", unit="rec"):
        row = check_record(span.record, max_images)
        row.update(uid=assign(span.record, span.index), index=span.index, offset=span.offset, length=span.length)
        for name in COLUMNS:
            columns[name].append(row[name])
    examples = pd.DataFrame(columns, columns=COLUMNS)
    examples.attrs["renamed_duplicate_ids"] = assign.renamed
    return examples.astype({"index": "int64", "offset": "int64", "length": "int64", "has_image": "bool"})


def decode_error(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            # JPEG: decode at 1/8 scale; every byte of the entropy-coded data is still read,
            # so truncated or corrupt files fail as they would at full size, several times faster.
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - any decoder failure means the image is unusable
        return f"{type(error).__name__}: {error}"
    return None


def image_problem(path: Path, decode: bool) -> tuple[str, str] | None:
    if not path.is_file():
        return "image_missing", f"{path} does not exist"
    if decode:
        error = decode_error(path)
        if error is not None:
            return "image_unreadable", error
    return None


def check_image_files(examples: pd.DataFrame, image_root: Path, decode: bool, workers: int) -> None:
    """Exclude records whose image is missing or (with ``decode``) does not decode; each file is checked
    once however many records share it, in parallel threads (file systems and decoders release the GIL)."""
    candidates = examples.index[(examples.status == "ok") & examples.has_image]
    images = sorted(set(examples.loc[candidates, "image"]))
    problems = {}
    batches = [images[i : i + IMAGE_BATCH] for i in range(0, len(images), IMAGE_BATCH)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        desc = "decode images" if decode else "find images"
        for batch in progress(batches, total=len(batches), desc=f"{desc} ({len(images)} files)", unit="batch"):
            found = pool.map(image_problem, [image_root / image for image in batch], itertools.repeat(decode))
            problems.update((image, problem) for image, problem in zip(batch, found) if problem is not None)
    bad = examples.index.isin(candidates) & examples.image.isin(problems.keys())
    found = examples.loc[bad, "image"]
    examples.loc[bad, "status"] = "excluded"
    examples.loc[bad, "reason"] = found.map(lambda image: problems[image][0])
    examples.loc[bad, "detail"] = found.map(lambda image: problems[image][1])


def record_lengths(encoder, records: list[dict]) -> list:
    """Token lengths of a batch; a record the tokenizer or template cannot take gets its error instead."""
    try:
        return encoder.lengths(records)
    except Exception:  # noqa: BLE001 - find the records at fault, one by one
        lengths = []
        for record in records:
            try:
                lengths += encoder.lengths([record])
            except Exception as error:  # noqa: BLE001 - any failure means the record cannot be encoded
                lengths.append(f"{type(error).__name__}: {error}")
        return lengths


def check_lengths(examples: pd.DataFrame, annotations: Path, model: Path, stats: StageStats) -> None:
    """Count every usable record's tokens with the proxy; exclude those whose image would be cut."""
    encoder = ConversationEncoder.of_checkpoint(model)
    max_length = encoder.encoding.max_length
    usable = examples.index[examples.status == "ok"]
    tokens = pd.Series(pd.NA, index=examples.index, dtype="Int64")
    batches = [usable[i : i + TOKEN_BATCH] for i in range(0, len(usable), TOKEN_BATCH)]
    with SourceRecords(annotations, examples.loc[usable]) as records:
        done = 0
        for batch in progress(batches, total=len(batches), desc="count tokens", unit="batch"):
            for row, length in zip(batch, record_lengths(encoder, records[done : done + len(batch)])):
                if isinstance(length, str):
                    exclude(examples, row, "not_encodable", length)
                    continue
                tokens[row] = length.tokens
                if not length.fits(max_length):
                    detail = (f"the image ends at token {length.image_end}; max_length {max_length} "
                              "leaves no text after it")
                    exclude(examples, row, "image_cut_by_max_length", detail)
                elif length.tokens > max_length:
                    stats.add("truncated")
            done += len(batch)
    examples["tokens"] = tokens
    stats.set("max_length", max_length)


def exclude(examples: pd.DataFrame, row, reason: str, detail: str) -> None:
    examples.loc[row, ["status", "reason", "detail"]] = ["excluded", reason, detail]


def prepare(annotations: Path, image_root: Path, max_images: int, check_images: bool, workers: int,
            stats: StageStats, model: Path | None = None) -> pd.DataFrame:
    """The examples table; ``model`` (checkpoint 0 of the proxy) adds the token-length check."""
    examples = validate(Path(annotations), max_images)
    check_image_files(examples, Path(image_root), check_images, workers)
    if model is not None:
        check_lengths(examples, Path(annotations), Path(model), stats)
    stats.add("in", len(examples))
    ok = examples[examples.status == "ok"]
    stats.add("ok", len(ok))
    stats.add("ok_image", int(ok.has_image.sum()))
    stats.add("ok_text_only", int((~ok.has_image).sum()))
    stats.add("renamed_duplicate_ids", examples.attrs.get("renamed_duplicate_ids", 0))
    for reason, n in examples.reason.value_counts().sort_index().items():
        stats.exclude(reason, int(n))
    return examples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, type=Path, help="LLaVA-format JSON list of records")
    add_input_arguments(parser, "image_root")
    parser.add_argument("--model", required=True, type=Path,
                        help="the proxy's checkpoint 0: its tokenizer, chat template and image tokens count lengths")
    parser.add_argument("--out", required=True, type=Path, help="examples.parquet to write")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads for the image checks")
    add_settings(parser, "prepare")


def run(args: argparse.Namespace) -> None:
    stats = StageStats("prepare")
    examples = prepare(args.annotations, args.image_root, args.max_images, args.check_images, args.workers, stats,
                       args.model)
    write_parquet(examples, args.out)
    stats.add("out", len(examples))
    stats.finish(args.stats)
