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
import collections
import concurrent.futures
import functools
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from xmas.data.records import EMBEDDED, InvalidRecord, check_conversation, record_id
from xmas.data.sources import POSITION_COLUMNS, Source, as_source, logged, stage_source
from xmas.errors import XmasError
from xmas.io import atomic_path, read_parquet
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
    """Unique uids from the records' own ids, in source order: an id is kept where no earlier record took
    it; later copies get ``#2``, ``#3``, ... (the first suffix free at that point)."""

    def __init__(self):
        self.used: set[str] = set()
        self.next_copy: dict[str, int] = {}

    def __call__(self, base: str) -> str:
        uid, copy = base, self.next_copy.get(base, 1)
        if copy > 1:
            uid = f"{base}#{copy}"
        while uid in self.used:  # copies below next_copy are all taken, so each base is scanned once
            copy += 1
            uid = f"{base}#{copy}"
        self.next_copy[base] = copy
        self.used.add(uid)
        return uid


def unique_uids(records: Iterable) -> list[str]:
    assign = UniqueIds()
    return [assign(record_id(record, index)) for index, record in enumerate(records)]


def duplicate_renames(uid_chunks: Callable[[], Iterable[pd.Series]]) -> dict[int, str]:
    """The uids :class:`UniqueIds` gives the records whose id is taken (row number -> uid), without holding
    every id: ``uid_chunks()`` yields the ids in source order, and is read twice.

    Only two kinds of record can be renamed: one whose id repeats, and one whose id is a repeated id with a
    suffix (``a#2`` beside two ``a``), since every new name is a repeated id with a suffix. The first
    reading keeps a 64-bit hash per record to find the repeats; the second keeps those records' ids, to
    which :class:`UniqueIds` is applied in source order, as it would be to all of them.
    """
    hashes = [pd.util.hash_array(chunk.to_numpy(dtype=object)) for chunk in uid_chunks()]
    hashes = np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64)
    values, counts = np.unique(hashes, return_counts=True)
    shared = np.isin(hashes, values[counts > 1])
    del hashes, values, counts
    if not shared.any():
        return {}
    candidates: dict[int, str] = {}
    start = 0
    for chunk in uid_chunks():
        ids = chunk.to_numpy(dtype=object)
        rows = np.flatnonzero(shared[start : start + len(ids)] | chunk.str.contains("#", regex=False).to_numpy())
        candidates.update(zip((start + rows).tolist(), ids[rows].tolist()))
        start += len(ids)
    repeated = {uid for uid, n in collections.Counter(candidates.values()).items() if n > 1}
    assign, renames = UniqueIds(), {}
    for row, base in candidates.items():
        if base in repeated or any(base[:cut] in repeated for cut, char in enumerate(base) if char == "#"):
            uid = assign(base)
            if uid != base:
                renames[row] = uid
    return renames


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
    """The examples table as rows stream in, taken in chunks of compact frames (never millions of Python
    objects). ``embedded`` marks the rows whose images are embedded."""

    COLUMNS = [*COLUMNS, "embedded"]
    TYPES = {"index": "int64", "has_image": "bool", "embedded": "bool", **{name: "Int64" for name in POSITION_COLUMNS}}

    def __init__(self):
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

    def take(self) -> pd.DataFrame:
        """The rows so far, as a frame indexed from 0; the table starts again empty."""
        frame = pd.DataFrame(self.columns, columns=self.COLUMNS).astype(self.TYPES)
        self.start += len(self)
        self.columns = {name: [] for name in self.COLUMNS}
        return frame


CHUNK_ROWS = 1 << 16
# The types of the examples table's columns, so that every chunk is written alike (a chunk with no
# excluded record has only nulls in ``reason``).
ARROW_TYPES = {
    "index": pa.int64(),
    "has_image": pa.bool_(),
    "tokens": pa.int64(),
    **{name: pa.int64() for name in POSITION_COLUMNS},
}


def validated_chunks(
    source: Source, max_images: int, decode: bool, pool: concurrent.futures.Executor
) -> Iterator[tuple[pd.DataFrame, dict[int, list[str]]]]:
    """The examples table in chunks of CHUNK_ROWS rows, streamed: uid (the record's own id, made unique
    later by :func:`duplicate_renames`), index, structure checks, position. A chunk's ``image`` column holds
    a record's first image (``embedded`` tells whether its images are embedded); with each chunk comes a map
    from its rows of records with more image files to all of their paths. Embedded images are checked
    here, as they stream by (:func:`check_embedded`). An empty source gives one empty chunk."""
    table, more_images, pending = Table(), {}, []
    for found in progress(source.records(), total=source.count(), desc="prepare records", unit="rec"):
        row = check_record(found.record, max_images)
        row.update(uid=record_id(found.record, found.index), index=found.index, **found.position)
        row["embedded"] = row["status"] == "ok" and isinstance(found.record, dict) and EMBEDDED in found.record
        table.append(row)
        if row["embedded"]:
            pending.append((found.index, found.record[EMBEDDED]))
            if len(pending) >= IMAGE_BATCH:
                check_embedded(pending, table, pool, decode)
        elif len(row["images"]) > 1:
            more_images[found.index - table.start] = row["images"]
        if len(table) >= CHUNK_ROWS:
            check_embedded(pending, table, pool, decode)
            yield table.take(), more_images
            more_images = {}
    if len(table) or not table.start:
        check_embedded(pending, table, pool, decode)
        yield table.take(), more_images


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


class ImageFiles:
    """Checks of image files (see :func:`image_problem`) in parallel threads (file systems and decoders
    release the GIL); the last CHECKED_FILES results are kept, so a file that many records share is
    checked about once, in bounded memory."""

    CHECKED_FILES = 1 << 19

    def __init__(self, image_root: Path, decode: bool, links_inside_root: bool, pool: concurrent.futures.Executor):
        self.image_root, self.pool = image_root, pool
        self.check = functools.partial(
            image_problem,
            real_root=Path(os.path.realpath(image_root)) if links_inside_root else None,
            real_path=RealPaths(),
            decode=decode,
        )
        self.checked: collections.OrderedDict[str, tuple[str, str] | None] = collections.OrderedDict()

    def problems(self, images: Iterable[str]) -> dict[str, tuple[str, str]]:
        """The problem of each of ``images`` that has one."""
        images = sorted(set(images))
        unchecked = [image for image in images if image not in self.checked]
        for image, problem in zip(unchecked, self.pool.map(self.check, [self.image_root / i for i in unchecked])):
            self.checked[image] = problem
        for image in images:
            self.checked.move_to_end(image)
        while len(self.checked) > self.CHECKED_FILES:
            self.checked.popitem(last=False)
        return {image: self.checked[image] for image in images if self.checked[image] is not None}

    def exclude_unusable(self, chunk: pd.DataFrame, more_images: dict[int, list[str]], file_images: pd.Series) -> None:
        """Exclude the chunk's records with an image file that cannot be used, naming the first."""
        candidates = chunk.index[(chunk.status == "ok") & file_images]
        several = {row: paths for row, paths in more_images.items() if row in candidates}
        problems = self.problems([*chunk.loc[candidates, "image"], *(p for paths in several.values() for p in paths)])
        first_problem = {
            row: problems[image] for row, image in chunk.loc[candidates, "image"].items() if image in problems
        }
        for row, paths in several.items():
            found = [problems[path] for path in paths if path in problems]
            if found:
                first_problem[row] = found[0]
        rows = list(first_problem)
        chunk.loc[rows, "status"] = "excluded"
        chunk.loc[rows, "reason"] = [reason for reason, _ in first_problem.values()]
        chunk.loc[rows, "detail"] = [detail for _, detail in first_problem.values()]


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


def check_lengths(examples: pd.DataFrame, source: Source, encoder: ConversationEncoder, stats: StageStats) -> None:
    """Count every usable record's tokens with the proxy (its images' tokens from their sizes, where the
    family's depend on them); exclude those whose image would be cut, those too long to tokenize, and those
    with more images than the proxy's family takes."""
    max_length = encoder.encoding.max_length
    usable = examples.index[examples.status == "ok"]
    tokens = pd.Series(pd.NA, index=examples.index, dtype="Int64")
    with source.reader(examples.loc[usable]) as records:
        for start in range(0, len(usable), TOKEN_BATCH):
            batch = usable[start : start + TOKEN_BATCH]
            rows, fitting = exclude_unfit(examples, batch, records[start : start + len(batch)], encoder)
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
    examples["tokens"] = tokens
    stats.set("max_length", max_length)


def exclude(examples: pd.DataFrame, row, reason: str, detail: str) -> None:
    examples.loc[row, ["status", "reason", "detail"]] = ["excluded", reason, detail]


def prepared_chunks(
    source: Source | Path, image_root: Path | None, settings, workers: int, stats: StageStats, model: Path | None = None
) -> Iterator[pd.DataFrame]:
    """The examples table in chunks of CHUNK_ROWS rows, each checked whole before the next is read, so that
    memory does not grow with the source; uids are the records' own ids (see :func:`duplicate_renames`).
    ``settings``: the prepare stage's (:func:`xmas.settings.settings_class`); ``model`` (checkpoint 0 of the
    proxy) adds the token-length check."""
    source = as_source(source)
    encoder = None if model is None else ConversationEncoder.of_checkpoint(Path(model), image_root=image_root)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        files = None
        for chunk, more_images in validated_chunks(source, settings.max_images, settings.check_images, pool):
            file_images = chunk.has_image & ~chunk.pop("embedded")
            if (file_images & (chunk.status == "ok")).any():
                if files is None:
                    if image_root is None:
                        raise XmasError(
                            f"{source.given}: its records name image files; give the folder they are relative to "
                            "(--image-root, config dataset.image_root)"
                        )
                    links_inside_root = settings.image_links == "inside_root"
                    files = ImageFiles(Path(image_root), settings.check_images, links_inside_root, pool)
                files.exclude_unusable(chunk, more_images, file_images)
            if encoder is not None:
                check_lengths(chunk, source, encoder, stats)
            count(chunk, stats)
            yield chunk


def count(chunk: pd.DataFrame, stats: StageStats) -> None:
    ok = chunk[chunk.status == "ok"]
    stats.add("in", len(chunk))
    stats.add("ok", len(ok))
    stats.add("ok_image", int(ok.has_image.sum()))
    stats.add("ok_text_only", int((~ok.has_image).sum()))
    for reason, n in chunk.reason.value_counts().items():
        stats.exclude(reason, int(n))


def prepare(
    source: Source | Path, image_root: Path | None, settings, workers: int, stats: StageStats, model: Path | None = None
) -> pd.DataFrame:
    """The whole examples table in memory (for small sources; :func:`write_examples` streams it to a file)."""
    examples = pd.concat(list(prepared_chunks(source, image_root, settings, workers, stats, model)), ignore_index=True)
    renames = duplicate_renames(lambda: [examples.uid])
    examples.loc[list(renames), "uid"] = list(renames.values())
    stats.add("renamed_duplicate_ids", len(renames))
    return examples


def arrow_schema(chunk: pd.DataFrame) -> pa.Schema:
    fields = [pa.field(name, ARROW_TYPES.get(name, pa.string())) for name in chunk.columns]
    return pa.Table.from_pandas(chunk.head(0), schema=pa.schema(fields), preserve_index=False).schema


def write_examples(chunks: Iterable[pd.DataFrame], out: Path, stats: StageStats) -> Path | None:
    """Write the chunks as the examples table ``out``, their duplicate ids renamed; with no usable record,
    write it to :func:`excluded_table` instead (none: no record at all). Returns the path written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, scratch = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".chunks", dir=out.parent)
    os.close(handle)
    scratch = Path(scratch)
    try:
        writer = None
        for chunk in chunks:
            if writer is None:
                schema = arrow_schema(chunk)
                writer = pq.ParquetWriter(scratch, schema)
            writer.write_table(pa.Table.from_pandas(chunk, schema=schema, preserve_index=False))
        writer.close()
        renames = duplicate_renames(lambda: uid_chunks(scratch))
        stats.add("renamed_duplicate_ids", len(renames))
        if not stats.counts["in"]:
            return None
        table = out if stats.counts["ok"] else excluded_table(out)
        with atomic_path(table) as tmp:
            if renames:
                renamed_copy(scratch, tmp, renames)
            else:
                os.replace(scratch, tmp)
        return table
    finally:
        scratch.unlink(missing_ok=True)


def uid_chunks(path: Path) -> Iterator[pd.Series]:
    with pq.ParquetFile(path) as table:
        for group in range(table.num_row_groups):
            yield table.read_row_group(group, columns=["uid"]).column(0).to_pandas()


def renamed_copy(path: Path, out: Path, renames: dict[int, str]) -> None:
    """Copy the table at ``path`` to ``out``, row group by row group, with the uids of ``renames``' rows."""
    with pq.ParquetFile(path) as table, pq.ParquetWriter(out, table.schema_arrow) as writer:
        start = 0
        for group in range(table.num_row_groups):
            rows = table.read_row_group(group)
            uids = rows.column("uid").to_pandas()
            changed = {row - start: uid for row, uid in renames.items() if start <= row < start + len(uids)}
            uids.iloc[list(changed)] = list(changed.values())
            writer.write_table(rows.set_column(rows.schema.get_field_index("uid"), "uid", pa.array(uids, pa.string())))
            start += len(uids)


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


def nothing_usable(annotations: Path, stats: StageStats, table: Path | None) -> str:
    if table is None:
        return f"{annotations} holds no records (an empty list): there is nothing to train on"
    counts = ", ".join(f"{reason}={n}" for reason, n in sorted(stats.excluded.items()))
    first = read_parquet(table).iloc[0]  # small: every record was excluded, usually for one reason
    return (
        f"{annotations}: none of its {stats.counts['in']} records is usable ({counts}); e.g. record "
        f"{first['index']} (uid {first.uid!r}): {first.reason}: {first.detail}. Every record and why it was "
        f"excluded: {table}"
    )


def run(args: argparse.Namespace) -> None:
    stats = StageStats("prepare")
    settings = settings_of(args, "prepare")
    source = logged(stage_source(args.annotations, settings))
    chunks = prepared_chunks(source, args.image_root, settings, args.workers, stats, args.model)
    written = write_examples(chunks, args.out, stats)
    if written != args.out:
        stats.finish(args.stats)
        raise XmasError(nothing_usable(args.annotations, stats, written))
    excluded_table(args.out).unlink(missing_ok=True)  # left by an earlier run that found nothing usable
    stats.add("out", stats.counts["in"])
    stats.finish(args.stats)
