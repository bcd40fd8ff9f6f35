"""Rule ``prepare``: validate every source record and write ``results/data/examples.parquet``.

A record is ``ok`` when every later stage can encode it: its structure is valid, its image is a
readable file, and (counted with the proxy's tokenizer, chat template and image tokens, as
checkpoint 0 holds them) its image fits within ``max_length`` with text after it. Longer text
is cut at the end, as LLaVA does; ``tokens`` records each record's full length.

Nothing is dropped: a record that cannot be used stays in the table with ``status=excluded``
and a ``reason`` code, so the final manifest accounts for every source record. The source is
streamed (:mod:`xmas.data.sources`), one record (or row group) at a time, embedded images checked
as they pass; each row keeps the record's position (a JSON record's byte ``offset`` and ``length``,
a table's ``shard``, ``row_group`` and ``row``), so later stages read single records.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import io
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from PIL import Image

from xmas.data.records import EMBEDDED, InvalidRecord, check_conversation, record_id
from xmas.data.sources import POSITION_COLUMNS, Source, as_source, logged, stage_source
from xmas.errors import XmasError
from xmas.io import write_parquet
from xmas.models.encoding import ConversationEncoder
from xmas.progress import StageStats, add_input_arguments, progress
from xmas.settings import add_settings, settings_of

COLUMNS = ["uid", "index", "has_image", "image", "source", "status", "reason", "detail", *POSITION_COLUMNS]
IMAGE_BATCH = 4096
TOKEN_BATCH = 1024
# A conversation longer than this many characters per token of max_length is excluded as too_long: no
# tokenizer averages tokens that long, so all but a sliver of it would be cut, and every stage would
# tokenize all of it each time it reads the record (a 5 MB turn: ~10 s and ~1.5 GB each time).
CHARS_PER_TOKEN = 250


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
    """The row fields that depend on the record alone, and its image paths (``images``); image files are
    checked later, in parallel."""
    row = {
        "has_image": False,
        "image": None,
        "source": None,
        "status": "ok",
        "reason": None,
        "detail": None,
        "images": [],
    }
    try:
        if not isinstance(record, dict):
            raise InvalidRecord("record_not_object", f"record is a {type(record).__name__}, not an object")
        paths = check_conversation(record, max_images)
        image = paths[0] if paths else None
        row.update(has_image=image is not None, image=image, source=source_of(record, image), images=paths)
    except InvalidRecord as invalid:
        row.update(status="excluded", reason=invalid.reason, detail=invalid.detail)
    return row


class Table:
    """The examples table as rows stream in: compact frames of CHUNK_ROWS rows, so that millions of records
    are never held as Python objects. ``embedded`` marks the rows whose images are embedded."""

    COLUMNS = [*COLUMNS, "embedded"]
    TYPES = {"index": "int64", "has_image": "bool", "embedded": "bool", **{name: "Int64" for name in POSITION_COLUMNS}}

    def __init__(self):
        self.frames: list[pd.DataFrame] = []
        self.start = 0
        self.columns: dict[str, list] = {name: [] for name in self.COLUMNS}

    def append(self, row: dict) -> None:
        for name in self.COLUMNS:
            self.columns[name].append(row.get(name))

    def exclude(self, index: int, reason: str, detail: str) -> None:
        position = index - self.start
        self.columns["status"][position], self.columns["reason"][position] = "excluded", reason
        self.columns["detail"][position] = detail

    def __len__(self) -> int:
        return len(self.columns["index"])

    def flush(self) -> None:
        if len(self):
            self.frames.append(pd.DataFrame(self.columns, columns=self.COLUMNS).astype(self.TYPES))
            self.start += len(self)
            self.columns = {name: [] for name in self.COLUMNS}

    def frame(self) -> pd.DataFrame:
        self.flush()
        if not self.frames:
            return pd.DataFrame({name: [] for name in self.COLUMNS}).astype(self.TYPES)
        return pd.concat(self.frames, ignore_index=True) if len(self.frames) > 1 else self.frames[0]


CHUNK_ROWS = 1 << 16


def validate(source: Source, max_images: int, decode: bool, workers: int) -> tuple[pd.DataFrame, dict]:
    """One row per record of the source, streamed: uid, index, structure checks, position. The table's
    ``image`` column holds a record's first image (``embedded`` tells whether its images are embedded); the
    second item maps the rows of records with more image files to all of their paths. Embedded images are
    checked here, as they stream by (:func:`check_embedded`)."""
    table, more_images, pending = Table(), {}, []
    assign = UniqueIds()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for found in progress(source.records(), total=source.count(), desc="validate records", unit="rec"):
            row = check_record(found.record, max_images)
            row.update(uid=assign(found.record, found.index), index=found.index, **found.position)
            row["embedded"] = row["status"] == "ok" and isinstance(found.record, dict) and EMBEDDED in found.record
            table.append(row)
            if row["embedded"]:
                pending.append((found.index, found.record[EMBEDDED]))
                if len(pending) >= IMAGE_BATCH:
                    check_embedded(pending, table, pool, decode)
            elif len(row["images"]) > 1:
                more_images[found.index] = row["images"]
            if len(table) >= CHUNK_ROWS:
                check_embedded(pending, table, pool, decode)
                table.flush()
        check_embedded(pending, table, pool, decode)
    examples = table.frame()
    examples.attrs["renamed_duplicate_ids"] = assign.renamed
    return examples, more_images


def check_embedded(pending: list[tuple[int, list]], table: Table, pool, decode: bool) -> None:
    """Exclude the pending records with an embedded image that does not open (with ``decode``: that does not
    decode), naming the first; their images are held only until then."""
    flat = [(index, position, blob) for index, blobs in pending for position, blob in enumerate(blobs)]
    problems = pool.map(lambda item: MIXED if item[2] is None else open_error(io.BytesIO(item[2]), decode), flat)
    excluded = set()
    for (index, position, _), problem in zip(flat, problems):
        if problem is not None and index not in excluded:
            excluded.add(index)
            table.exclude(index, "image_unreadable", f"embedded image {position}: {problem}")
    pending.clear()


MIXED = "the record mixes embedded images with image files, which xmas does not read"


def open_error(file, decode: bool = True) -> str | None:
    """Why the image in ``file`` (a path or bytes) cannot be used: it does not open (its header is refused,
    an image bomb's too), or with ``decode`` does not decode; None if it can."""
    try:
        with Image.open(file) as image:
            if decode:
                # JPEG: decode at 1/8 scale; every byte of the entropy-coded data is still read,
                # so truncated or corrupt files fail as they would at full size, several times faster.
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - any decoder failure means the image is unusable
        return f"{type(error).__name__}: {error}"
    return None


class RealPaths:
    """Paths with every link on the way resolved; images share few folders, so each folder is resolved once."""

    def __init__(self):
        self.folders = functools.cache(lambda folder: Path(os.path.realpath(folder)))

    def __call__(self, path: Path) -> Path:
        real = self.folders(path.parent) / path.name
        return Path(os.path.realpath(real)) if real.is_symlink() else real


def image_problem(path: Path, real_root: Path | None, real_path: RealPaths, decode: bool) -> tuple[str, str] | None:
    """Why the image at ``path`` cannot be used: it is missing, not a file, reached through a link that
    leaves ``real_root`` (None: links may lead anywhere), or (with ``decode``) does not decode; None if it can."""
    try:
        if not path.exists():
            return "image_missing", f"{path} does not exist"
        real = real_path(path)
        if real_root is not None and not real.is_relative_to(real_root):
            return "image_outside_root", f"{path} leads through a link to {real}, outside the image root {real_root}"
        if not real.is_file():
            kind = "directory" if real.is_dir() else "special file"
            return "image_not_a_file", f"{path} is a {kind}, not an image file"
    except OSError as error:  # a name too long for the file system, a permission denied, ...
        return "image_missing", f"{path} cannot be looked up: {error}"
    if decode:
        error = open_error(path)
        if error is not None:
            return "image_unreadable", error
    return None


def check_image_files(
    examples: pd.DataFrame,
    more_images: dict[int, list[str]],
    file_images: pd.Series,
    image_root: Path,
    decode: bool,
    links_inside_root: bool,
    workers: int,
) -> None:
    """Exclude records with an image that cannot be used (see :func:`image_problem`), naming the first; each
    file is checked once however many records share it, in parallel threads (file systems and decoders
    release the GIL)."""
    candidates = examples.index[(examples.status == "ok") & file_images]
    several = {row: paths for row, paths in more_images.items() if row in candidates}
    images = sorted(set(examples.loc[candidates, "image"]).union(*several.values()))
    check = functools.partial(
        image_problem,
        real_root=Path(os.path.realpath(image_root)) if links_inside_root else None,
        real_path=RealPaths(),
        decode=decode,
    )
    problems = {}
    batches = [images[i : i + IMAGE_BATCH] for i in range(0, len(images), IMAGE_BATCH)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        desc = "decode images" if decode else "find images"
        for batch in progress(batches, total=len(batches), desc=f"{desc} ({len(images)} files)", unit="batch"):
            found = pool.map(check, [image_root / image for image in batch])
            problems.update((image, problem) for image, problem in zip(batch, found) if problem is not None)
    first_problem = {
        row: problems[image] for row, image in examples.loc[candidates, "image"].items() if image in problems
    }
    for row, paths in several.items():
        found = [problems[path] for path in paths if path in problems]
        if found:
            first_problem[row] = found[0]
    rows = list(first_problem)
    examples.loc[rows, "status"] = "excluded"
    examples.loc[rows, "reason"] = [reason for reason, _ in first_problem.values()]
    examples.loc[rows, "detail"] = [detail for _, detail in first_problem.values()]


def too_long(record: dict, max_length: int) -> str | None:
    """Why the record's conversation is too long to tokenize (see CHARS_PER_TOKEN); None if it is not."""
    sizes = [len(turn["value"]) for turn in record["conversations"]]
    limit = CHARS_PER_TOKEN * max_length
    if sum(sizes) <= limit:
        return None
    longest = max(range(len(sizes)), key=sizes.__getitem__)
    return (
        f"the conversation has {sum(sizes)} characters (turn {longest}: {sizes[longest]}); more than {limit}, "
        f"{CHARS_PER_TOKEN} per token of max_length {max_length}, is never kept whole"
    )


def exclude_unfit(
    examples: pd.DataFrame, rows, records: list[dict], encoder: ConversationEncoder
) -> tuple[list, list[dict]]:
    """Exclude the records with more images than the proxy's family takes, and those too long to tokenize;
    return the rows and records of the others."""
    kept_rows, kept = [], []
    for row, record in zip(rows, records):
        images = encoder.too_many_images(record)
        why = None if images else too_long(record, encoder.encoding.max_length)
        if images:
            exclude(examples, row, "too_many_images", f"{images} (the proxy)")
        elif why:
            exclude(examples, row, "too_long", why)
        else:
            kept_rows.append(row)
            kept.append(record)
    return kept_rows, kept


def check_lengths(
    examples: pd.DataFrame, source: Source, image_root: Path | None, model: Path, stats: StageStats
) -> None:
    """Count every usable record's tokens with the proxy (its images' tokens from their sizes, where the
    family's depend on them); exclude those whose image would be cut, those too long to tokenize, and those
    with more images than the proxy's family takes."""
    encoder = ConversationEncoder.of_checkpoint(model, image_root=image_root)
    max_length = encoder.encoding.max_length
    usable = examples.index[examples.status == "ok"]
    tokens = pd.Series(pd.NA, index=examples.index, dtype="Int64")
    batches = [usable[i : i + TOKEN_BATCH] for i in range(0, len(usable), TOKEN_BATCH)]
    with source.reader(examples.loc[usable]) as records:
        done = 0
        for batch in progress(batches, total=len(batches), desc="count tokens", unit="batch"):
            rows, fitting = exclude_unfit(examples, batch, records[done : done + len(batch)], encoder)
            for row, length in zip(rows, encoder.lengths_or_errors(fitting) if fitting else []):
                if isinstance(length, str):
                    exclude(examples, row, "not_encodable", length)
                    continue
                tokens[row] = length.tokens
                if not length.fits(max_length):
                    detail = (
                        f"the image ends at token {length.image_end}; max_length {max_length} leaves no text after it"
                    )
                    exclude(examples, row, "image_cut_by_max_length", detail)
                elif length.tokens > max_length:
                    stats.add("truncated")
            done += len(batch)
    examples["tokens"] = tokens
    stats.set("max_length", max_length)


def exclude(examples: pd.DataFrame, row, reason: str, detail: str) -> None:
    examples.loc[row, ["status", "reason", "detail"]] = ["excluded", reason, detail]


def prepare(
    source: Source | Path, image_root: Path | None, settings, workers: int, stats: StageStats, model: Path | None = None
) -> pd.DataFrame:
    """The examples table; ``settings``: the prepare stage's (:func:`xmas.settings.settings_class`); ``model``
    (checkpoint 0 of the proxy) adds the token-length check."""
    source = as_source(source)
    examples, more_images = validate(source, settings.max_images, settings.check_images, workers)
    links_inside_root = settings.image_links == "inside_root"
    file_images = examples.has_image & ~examples.pop("embedded")
    if (file_images & (examples.status == "ok")).any():
        if image_root is None:
            raise XmasError(
                f"{source.given}: its records name image files; give the folder they are relative to "
                "(--image-root, config dataset.image_root)"
            )
        check_image_files(
            examples, more_images, file_images, Path(image_root), settings.check_images, links_inside_root, workers
        )
    if model is not None:
        check_lengths(examples, source, image_root, Path(model), stats)
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
    add_input_arguments(parser, "annotations", "image_root")
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        help="the proxy's checkpoint 0: its tokenizer, chat template and image tokens count lengths",
    )
    parser.add_argument("--out", required=True, type=Path, help="examples.parquet to write")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="threads for the image checks")
    add_settings(parser, "prepare")


def excluded_table(out: Path) -> Path:
    """Where a prepare that finds nothing usable writes its table instead of ``out`` (which Snakemake would
    delete with the failed job): ``examples.excluded.parquet``."""
    return out.with_name(f"{out.stem}.excluded{out.suffix}")


def nothing_usable(annotations: Path, examples: pd.DataFrame, table: Path) -> str:
    if examples.empty:
        return f"{annotations} holds no records (an empty list): there is nothing to train on"
    counts = ", ".join(f"{reason}={n}" for reason, n in examples.reason.value_counts().sort_index().items())
    first = examples.iloc[0]
    return (
        f"{annotations}: none of its {len(examples)} records is usable ({counts}); e.g. record {first['index']} "
        f"(uid {first.uid!r}): {first.reason}: {first.detail}. Every record and why it was excluded: {table}"
    )


def run(args: argparse.Namespace) -> None:
    stats = StageStats("prepare")
    settings = settings_of(args, "prepare")
    source = logged(stage_source(args.annotations, settings))
    examples = prepare(source, args.image_root, settings, args.workers, stats, args.model)
    table = excluded_table(args.out)
    if not (examples.status == "ok").any():
        if not examples.empty:
            write_parquet(examples, table)
        stats.finish(args.stats)
        raise XmasError(nothing_usable(args.annotations, examples, table))
    write_parquet(examples, args.out)
    table.unlink(missing_ok=True)  # left by an earlier run that found nothing usable
    stats.add("out", len(examples))
    stats.finish(args.stats)
