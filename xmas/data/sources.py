"""Where the records come from, in the formats people hold them: a JSON list or JSON Lines file (LLaVA's or
LLaMA-Factory's ShareGPT records), parquet shards (a file, a folder or a glob) with the images embedded, or
a folder ``datasets``' ``save_to_disk`` wrote.

A :class:`Source` streams its records once, with each record's position (:meth:`Source.records`, what
``prepare`` reads), reads single records back by those positions (:meth:`Source.reader`, what the later
stages read) and writes a subset in its own format (:meth:`Source.write_subset`). A JSON record's position is
its byte span (offset, length); a table record's is (shard, row_group, row). Tables are read a row group at a
time, never whole.
"""

from __future__ import annotations

import collections
import glob
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from xmas.data.annotations import SourceRecords, iter_spans
from xmas.data.records import (
    CAULDRON,
    LLAMAFACTORY_DEFAULT,
    LLAVA,
    SHAREGPT,
    Layout,
    as_llava,
    layout_of_record,
    matches_uid,
)
from xmas.errors import XmasError
from xmas.io import atomic_path, write_raw_records
from xmas.progress import log

JSON_POSITION = ["offset", "length"]
TABLE_POSITION = ["shard", "row_group", "row"]
POSITION_COLUMNS = [*JSON_POSITION, *TABLE_POSITION]
JSON_KINDS = ("json", "jsonl")
GLOB = re.compile(r"[*?[]")
# Rows a written parquet subset gathers before it writes a row group.
ROW_GROUP_ROWS = 1024
# Row groups a reader keeps decoded: the later stages read in source order, or nearly.
CACHED_ROW_GROUPS = 4


class Positioned(NamedTuple):
    index: int  # in source order, from 0
    position: dict  # the record's position columns
    record: object  # as a LLaVA record


class Shard:
    """One file of a table source: a parquet file (its row groups) or an Arrow stream of ``save_to_disk``
    (its record batches, memory-mapped), read a row group at a time."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind
        self._file = self._batches = None

    def _open(self):
        if self._file is None and self._batches is None:
            try:
                if self.kind == "parquet":
                    self._file = pq.ParquetFile(self.path)
                else:
                    self._batches = read_arrow(self.path).to_batches()
            except FileNotFoundError:
                raise XmasError(f"{self.path}: file not found") from None
            except (pa.ArrowException, OSError) as error:
                what = "a parquet file" if self.kind == "parquet" else "an Arrow file of datasets' save_to_disk"
                raise XmasError(f"{self.path}: not {what} ({error})") from None

    @property
    def schema(self) -> pa.Schema:
        self._open()
        return self._file.schema_arrow if self._file is not None else self._batches[0].schema

    @property
    def rows(self) -> int:
        if self.kind == "parquet" and self._file is None:
            try:
                return pq.read_metadata(self.path).num_rows  # without holding the file open
            except (pa.ArrowException, OSError):
                pass  # _open names the problem
        self._open()
        return self._file.metadata.num_rows if self._file is not None else sum(len(batch) for batch in self._batches)

    def close(self) -> None:
        """Let go of the file (a source of thousands of shards must not hold them all open)."""
        if self._file is not None:
            self._file.close()
        self._file = self._batches = None

    @property
    def row_groups(self) -> int:
        self._open()
        return self._file.num_row_groups if self._file is not None else len(self._batches)

    def read(self, row_group: int, columns: list[str] | None = None) -> pa.Table:
        self._open()
        try:
            if self._file is not None:
                return self._file.read_row_group(row_group, columns=columns)
            table = pa.Table.from_batches([self._batches[row_group]])
            return table.select(columns) if columns is not None else table
        except (pa.ArrowException, OSError) as error:
            column = self.unreadable_column(row_group, columns)
            where = f", column {column!r}," if column else ""
            raise XmasError(
                f"{self.path}: row group {row_group}{where} cannot be read ({type(error).__name__}: {error})"
            ) from None

    def unreadable_column(self, row_group: int, columns: list[str] | None) -> str | None:
        """The first of ``columns`` that a row group's read fails on, read one at a time (None: none alone)."""
        for name in columns or self.schema.names if self._file is not None else []:
            try:
                self._file.read_row_group(row_group, columns=[name])
            except (pa.ArrowException, OSError):
                return name
        return None


def rows_of(table: pa.Table) -> list[dict]:
    """A table's rows as Python records. Text that is not UTF-8 (parquet does not check) arrives with its bad
    bytes as lone surrogates (``surrogateescape``), so that validation excludes that record alone as
    ``invalid_unicode`` and names its field."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        return [row_of(table.slice(row, 1)) for row in range(table.num_rows)]


def row_of(row: pa.Table) -> dict:
    try:
        return row.to_pylist()[0]
    except UnicodeDecodeError:
        fields = row.schema
        return {
            field.name: escaped(row.column(field.name).cast(as_binary(field.type)).to_pylist()[0], field.type)
            for field in fields
        }


def as_binary(kind: pa.DataType) -> pa.DataType:
    """``kind`` with its text as bytes (the cast only relabels: it checks nothing)."""
    if pa.types.is_string(kind):
        return pa.binary()
    if pa.types.is_large_string(kind):
        return pa.large_binary()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        make = pa.list_ if pa.types.is_list(kind) else pa.large_list
        return make(pa.field(kind.value_field.name, as_binary(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([pa.field(field.name, as_binary(field.type)) for field in kind])
    return kind


def escaped(value, kind: pa.DataType):
    """A value read as :func:`as_binary`'s type, its text decoded again, bad bytes as lone surrogates."""
    if value is None:
        return None
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return value.decode("utf-8", "surrogateescape")
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return [escaped(item, kind.value_type) for item in value]
    if pa.types.is_struct(kind):
        return {field.name: escaped(value.get(field.name), field.type) for field in kind}
    return value


def read_arrow(path: Path) -> pa.Table:
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source).read_all()


@dataclass(frozen=True)
class Source:
    """Records in one of the formats (``kind``: json, jsonl, parquet or arrow), in ``files``; ``layout`` says
    where a record keeps its parts (None: each JSON record by its own keys, LLaVA's or ShareGPT's)."""

    given: str
    kind: str
    files: tuple[Path, ...]
    layout: Layout | None
    shards: tuple[Shard, ...] = field(default=(), compare=False, repr=False)
    named: tuple[str, ...] = ()  # the table's columns dataset.columns names: each shard must have them

    @property
    def suffix(self) -> str:
        """The file name suffix of the source's format, which its subsets keep."""
        return {"json": ".json", "jsonl": ".jsonl"}.get(self.kind, ".parquet")

    @property
    def description(self) -> str:
        if self.kind in JSON_KINDS:
            what = "a JSON list" if self.kind == "json" else "JSON Lines"
            layout = "each record LLaVA's or ShareGPT's by its keys" if self.layout is None else describe(self.layout)
            return f"{what} ({layout})"
        what = "parquet" if self.kind == "parquet" else "datasets' save_to_disk (Arrow)"
        return f"{what}, {len(self.files)} shard(s), {describe(self.layout)}"

    def count(self) -> int | None:
        """How many records a table holds, from its metadata; None for JSON (known once read)."""
        return None if self.kind in JSON_KINDS else sum(shard.rows for shard in self.shards)

    def convert(self, record: object) -> object:
        return as_llava(record) if self.layout is None else self.layout.as_llava(record)

    def records(self) -> Iterator[Positioned]:
        """Every record in source order, with its position, streamed."""
        if self.kind in JSON_KINDS:
            for span in iter_spans(self.files[0], convert=self.convert):
                yield Positioned(span.index, {"offset": span.offset, "length": span.length}, span.record)
            return
        index = 0
        columns = record_columns(self.shards[0].schema, self.layout)
        for number, shard in enumerate(self.shards):
            check_columns(shard, self.layout, self.named, columns, self.files[0])
            for row_group in range(shard.row_groups):
                rows = rows_of(shard.read(row_group, columns))
                for row, record in enumerate(rows):
                    position = {"shard": number, "row_group": row_group, "row": row}
                    yield Positioned(index, position, self.convert(record))
                    index += 1
            shard.close()

    def reader(self, rows: pd.DataFrame) -> Sequence:
        """The records at ``rows``' positions (with uid and index), read on demand, each checked to be the
        record ``prepare`` saw there."""
        if self.kind in JSON_KINDS:
            return SourceRecords(self.files[0], rows, self.convert)
        return TableRecords(self, rows)

    def write_subset(self, rows: pd.DataFrame, out: Path) -> int:
        """The records at ``rows``' positions, in source order, in the source's format: JSON records byte for
        byte, table rows whole (every column, images embedded) under the source's schema. Returns how many."""
        chosen = rows.sort_values("index")
        if self.kind in JSON_KINDS:
            with self.reader(chosen) as records:
                raw = (records.raw(position) for position in range(len(records)))
                return write_raw_records(raw, out, lines=self.kind == "jsonl")
        return write_table_subset(self, chosen, out)


def describe(layout: Layout) -> str:
    known = {LLAVA: "LLaVA's", SHAREGPT: "ShareGPT's", CAULDRON: "The Cauldron's"}
    if layout in known:
        return f"{known[layout]} layout"
    tags = f"{layout.role_tag}/{layout.content_tag}" if layout.role_tag else f"{layout.user_tag}/{layout.assistant_tag}"
    return f"messages in {layout.messages!r} ({tags}), images in {layout.images!r}"


class TableRecords(Sequence):
    """Records of a table source at positions ``prepare`` recorded, read by row group (a few kept decoded)."""

    def __init__(self, source: Source, rows: pd.DataFrame):
        self.source = source
        self.uids = rows["uid"].tolist()
        self.indices = rows["index"].tolist()
        self.positions = list(zip(*(rows[name].astype("int64").tolist() for name in TABLE_POSITION)))
        self.columns = record_columns(source.shards[0].schema, source.layout) if len(rows) else None
        self.cache: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.uids)

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        shard, row_group, row = self.positions[position]
        table = self.row_group(shard, row_group)
        if row >= table.num_rows:
            raise self.changed(position, f"row group {row_group} has {table.num_rows} rows")
        record = self.source.convert(table.slice(row, 1).to_pylist()[0])
        if not matches_uid(record, self.indices[position], self.uids[position]):
            found = record.get("id") if isinstance(record, dict) else record
            raise self.changed(position, f"the record there has id {found!r}")
        return record

    def row_group(self, shard: int, row_group: int) -> pa.Table:
        key = (shard, row_group)
        if key not in self.cache:
            if len(self.cache) >= CACHED_ROW_GROUPS:
                self.cache.popitem(last=False)
            if self.cache and next(reversed(self.cache))[0] != shard:
                self.source.shards[next(reversed(self.cache))[0]].close()
            self.cache[key] = self.source.shards[shard].read(row_group, self.columns)
        self.cache.move_to_end(key)
        return self.cache[key]

    def changed(self, position: int, why: str) -> XmasError:
        shard, row_group, row = self.positions[position]
        where = f"row {row} of row group {row_group}"
        return changed(self.source.files[shard], self.indices[position], self.uids[position], where, why)

    def close(self) -> None:
        self.cache.clear()
        for shard in self.source.shards:
            shard.close()

    def __enter__(self) -> TableRecords:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def changed(file: Path, index: int, uid: str, where: str, why: str) -> XmasError:
    return XmasError(
        f"{file} changed after `xmas prepare` indexed it: record {index} (uid {uid!r}) was {where}, but {why}; "
        "run prepare again"
    )


def record_columns(schema: pa.Schema, layout: Layout) -> list[str]:
    """The columns a record is read from: the layout's that the table has (the rest are carried to subsets
    only)."""
    wanted = {layout.messages, layout.images, layout.id, layout.source}
    return [name for name in schema.names if name in wanted]


def check_columns(shard: Shard, layout: Layout, named: tuple[str, ...], columns: list[str], first: Path) -> None:
    """A shard must hold the messages as a list column; its images, where it has them, as paths or
    ``{bytes, path}`` structs (or lists of either); the columns dataset.columns ``named``; and the ``columns``
    the ``first`` shard holds records in."""
    schema = shard.schema
    if layout.messages not in schema.names:
        raise XmasError(
            f"{shard.path}: no column {layout.messages!r} of messages (set dataset.columns: messages=<column>); "
            f"its columns: {', '.join(schema.names)}"
        )
    for name in sorted({*named, *columns} - set(schema.names)):
        why = "dataset.columns names it" if name in named else f"{first}, the first shard, has it"
        raise XmasError(f"{shard.path}: no column {name!r} ({why}); its columns: {', '.join(schema.names)}")
    kind = schema.field(layout.messages).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise XmasError(f"{shard.path}: column {layout.messages!r} is {kind}, not a list of messages")
    if layout.images in schema.names:
        kind = schema.field(layout.images).type
        item = kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else kind
        embedded = pa.types.is_struct(item) and item.get_field_index("bytes") >= 0
        if not (embedded or pa.types.is_string(item) or pa.types.is_large_string(item)):
            raise XmasError(
                f"{shard.path}: column {layout.images!r} is {kind}, not images ({{bytes, path}} structs or paths, "
                "or lists of them)"
            )


def write_table_subset(source: Source, chosen: pd.DataFrame, out: Path) -> int:
    schema = source.shards[0].schema
    id_column = source.layout.id if source.layout.id in schema.names else None
    written, pending, opened = 0, [], None
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for (shard, row_group), group in chosen.groupby(["shard", "row_group"], sort=True):
            if opened is not None and opened != shard:
                source.shards[int(opened)].close()  # shards come in order: a source of thousands holds one open
            opened = shard
            table = source.shards[int(shard)].read(int(row_group))
            taken = table.take(pa.array(group["row"].astype("int64")))
            ids = taken.column(id_column).to_pylist() if id_column else [None] * len(group)
            for found, index, row, uid in zip(ids, group["index"], group["row"], group["uid"]):
                if not matches_uid({"id": found}, int(index), uid):
                    where = f"row {row} of row group {row_group}"
                    raise changed(source.files[int(shard)], index, uid, where, f"the record there has id {found!r}")
            try:
                pending.append(taken.cast(schema))
            except (pa.ArrowInvalid, ValueError) as error:
                raise XmasError(
                    f"{source.files[int(shard)]}: its columns differ from those of {source.files[0]} ({error}); "
                    "a subset keeps one schema"
                ) from None
            if sum(part.num_rows for part in pending) >= ROW_GROUP_ROWS:
                written += flush(writer, pending)
        written += flush(writer, pending)
    return written


def flush(writer: pq.ParquetWriter, pending: list[pa.Table]) -> int:
    if not pending:
        return 0
    table = pa.concat_tables(pending)
    writer.write_table(table)
    pending.clear()
    return table.num_rows


def locate(given: str) -> tuple[str, tuple[Path, ...]]:
    """(kind, files) of the records at ``given``: a glob or a folder of parquet shards, a save_to_disk folder,
    a parquet or Arrow file, or a JSON file (a list, or JSON Lines when it starts with an object)."""
    if GLOB.search(given):
        files = tuple(sorted(Path(name) for name in glob.glob(given, recursive=True) if Path(name).is_file()))
        if not files:
            raise XmasError(f"{given}: no file matches")
        return "parquet", files
    path = Path(given)
    if path.is_dir():
        state = path / "state.json"
        if state.is_file():
            try:
                names = [item["filename"] for item in json.loads(state.read_text())["_data_files"]]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise XmasError(f"{state}: not the state.json of datasets' save_to_disk ({error!r})") from None
            return "arrow", tuple(path / name for name in names)
        files = tuple(sorted(path.rglob("*.parquet")))
        if not files and (path / "dataset_dict.json").is_file():
            splits = sorted(folder.name for folder in path.iterdir() if (folder / "state.json").is_file())
            raise XmasError(
                f"{given}: a DatasetDict that datasets' save_to_disk wrote; name one of its splits as "
                f"dataset.annotations: {', '.join(str(path / split) for split in splits)}"
            )
        if not files:
            raise XmasError(
                f"{given}: a folder with no parquet shards (*.parquet) and no state.json of datasets' save_to_disk"
            )
        return "parquet", files
    if not path.is_file():
        raise XmasError(f"{given}: annotation file not found")
    if path.suffix == ".parquet":
        return "parquet", (path,)
    if path.suffix == ".arrow":
        return "arrow", (path,)
    return json_kind(path), (path,)


def json_kind(path: Path) -> str:
    """``json`` for a file that starts with a list, ``jsonl`` for one that starts with an object (either way
    the reader names what is wrong in the rest)."""
    with path.open("rb") as handle:
        start = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return "jsonl" if start.startswith(b"{") else "json"


def table_layout(schema: pa.Schema) -> Layout:
    """The layout a table is in, from its column names: The Cauldron's (``texts``, ``images``), ShareGPT's
    (``messages``), else LLaVA's (``conversations``), with ``data_source`` as the source where there is one
    (LLaVA-OneVision-Data's) and ``images`` for the images where there is no ``image``."""
    names = set(schema.names)
    if "texts" in names and not names & {"messages", "conversations"}:
        return CAULDRON
    layout = SHAREGPT if "messages" in names and "conversations" not in names else LLAVA
    changes = {}
    if "data_source" in names and layout.source not in names:
        changes["source"] = "data_source"
    if layout.images not in names and ({"image", "images"} & names):
        changes["images"] = "image" if "image" in names else "images"
    return layout.changed(changes)


def open_source(annotations: str | Path, format: str = "auto", columns: dict | None = None, tags: dict | None = None):
    """The records at ``annotations`` (settings ``dataset.format``, ``dataset.columns``, ``dataset.tags``)."""
    given = str(annotations)
    kind, files = locate(given)
    if format in ("llava", "sharegpt") and kind not in JSON_KINDS:
        raise XmasError(f"{given}: dataset.format is {format}, but this is {kind} data; set dataset.format to parquet")
    if format == "parquet" and kind in JSON_KINDS:
        raise XmasError(f"{given}: dataset.format is parquet, but this is a JSON file; set dataset.format to auto")
    renamed = {**(columns or {})}, {**(tags or {})}
    try:
        if kind in JSON_KINDS:
            return Source(given, kind, files, json_layout(files[0], format, *renamed))
        shards = tuple(Shard(path, kind) for path in files)
        layout = table_layout(shards[0].schema).changed(*renamed)
        return Source(given, kind, files, layout, shards, tuple(sorted(set(renamed[0].values()))))
    except ValueError as error:
        raise XmasError(f"{given}: dataset.columns or dataset.tags: {error}") from None


def json_layout(path: Path, format: str, columns: dict, tags: dict) -> Layout | None:
    """A JSON source's layout: None (each record LLaVA's or ShareGPT's by its keys) unless columns or tags are
    renamed; then LLaVA's for ``llava``, LLaMA-Factory's defaults for ``sharegpt``, the first record's for
    ``auto``, renamed."""
    if not columns and not tags:
        return None
    if format == "llava":
        base = LLAVA
    elif format == "sharegpt":
        base = LLAMAFACTORY_DEFAULT
    else:
        first = next(iter_spans(path, convert=lambda record: record), None)
        base = layout_of_record(first.record) if first is not None else LLAVA
    return base.changed(columns, tags)


def as_source(records: str | Path | Source) -> Source:
    """A source as it is; a path as :func:`open_source` reads it by default."""
    return records if isinstance(records, Source) else open_source(records)


def stage_source(annotations: str | Path, settings) -> Source:
    """The source a stage reads, from its ``--annotations`` and its dataset settings."""
    return open_source(annotations, settings.format, settings.columns, settings.tags)


def logged(source: Source) -> Source:
    log.info("reading %s as %s", source.given, source.description)
    return source


@dataclass(frozen=True)
class LlamaFactoryEntry:
    """What a dataset of a LLaMA-Factory ``dataset_info.json`` says of its records."""

    annotations: str  # its file_name, under the dataset_info.json's folder
    media_dir: str  # where its image paths are relative to (LLaMA-Factory's default: the dataset_dir)
    format: str
    columns: dict
    tags: dict


LLAMAFACTORY_COLUMNS = ("messages", "images")
LLAMAFACTORY_TAGS = tuple(item.name for item in fields(Layout) if item.name.endswith("_tag"))


def llamafactory_entry(info: str | Path, name: str) -> LlamaFactoryEntry:
    """The dataset ``name`` of LLaMA-Factory's ``dataset_info.json`` at ``info``: a ShareGPT dataset in a local
    file or folder (its columns and tags over LLaMA-Factory's defaults)."""
    info = Path(info)
    try:
        entries = json.loads(info.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise XmasError(f"{info}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise XmasError(f"{info}: not a LLaMA-Factory dataset_info.json ({error})") from None
    if not isinstance(entries, dict) or name not in entries:
        known = ", ".join(entries) if isinstance(entries, dict) else "none"
        raise XmasError(f"{info}: no dataset {name!r} (it has: {known})")
    entry = entries[name]
    where = f"{info}: dataset {name!r}"
    if not isinstance(entry, dict) or "file_name" not in entry:
        hub = [
            key for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if key in entry
        ]
        raise XmasError(
            f"{where} has no local file_name{f' (it names {hub[0]})' if hub else ''}; xmas reads local data"
        )
    if entry.get("formatting", "alpaca") != "sharegpt":
        raise XmasError(
            f"{where} is {entry.get('formatting', 'alpaca')} data; xmas reads ShareGPT (formatting: sharegpt)"
        )
    columns = {key: value for key, value in (entry.get("columns") or {}).items() if key in LLAMAFACTORY_COLUMNS}
    tags = {key: value for key, value in (entry.get("tags") or {}).items() if key in LLAMAFACTORY_TAGS}
    data = info.parent / entry["file_name"]
    kind = locate(str(data))[0]
    fmt = "sharegpt" if kind in JSON_KINDS else "parquet"
    defaults = {column: getattr(LLAMAFACTORY_DEFAULT, column) for column in LLAMAFACTORY_COLUMNS}
    return LlamaFactoryEntry(str(data), str(info.parent), fmt, {**defaults, **columns}, tags)
