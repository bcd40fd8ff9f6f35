"""Annotation files (a JSON list or JSON Lines of LLaVA or ShareGPT records): a streaming reader that
records where each record lies, and a reader that fetches records by those byte spans.

``prepare`` streams the file once and writes every record's byte ``offset`` and ``length`` into
``examples.parquet``; later stages (training, trajectory shards, sampling) seek to the records they
need instead of loading a file that may hold 665k records (about 1 GB).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from xmas.data.records import as_llava, matches_uid
from xmas.errors import XmasError

CHUNK_BYTES = 8 << 20
WHITESPACE = re.compile(r"[ \t\n\r]*")
# A decoding error this close to the end of the buffer may only mean the record continues in the
# next chunk (a cut literal such as "tru" or "\u00"); longer cuts raise "Unterminated string".
CUT_MARGIN = 64
SPAN_COLUMNS = ["offset", "length"]


class Span(NamedTuple):
    index: int
    offset: int  # bytes from the start of the file
    length: int  # bytes
    record: object


class _Cursor:
    """A window of decoded text over the file, with the byte offset, line and column of its start."""

    def __init__(self, path: Path, chunk_bytes: int):
        self.path = path
        self.handle = open(path, "rb")
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.chunk_bytes = chunk_bytes
        self.text, self.ascii, self.eof = "", True, False
        self.pos = 0  # position in self.text
        self.byte = 0  # byte offset of self.text[self.pos]
        self.lines_before = 0  # newlines before self.text[0]
        self.column_base = 0  # characters since the last newline before self.text[0]
        self.first = True

    def close(self) -> None:
        self.handle.close()

    def refill(self) -> bool:
        """Drop the consumed text and append the next chunk; False (text untouched) at the end of the file."""
        while not self.eof:
            fresh = self.read_chunk()
            if not fresh:
                continue
            consumed = self.text[: self.pos]
            newlines = consumed.count("\n")
            self.lines_before += newlines
            self.column_base = (
                len(consumed) - consumed.rfind("\n") - 1 if newlines else self.column_base + len(consumed)
            )
            self.text = self.text[self.pos :] + fresh
            self.pos = 0
            self.ascii = self.text.isascii()
            return True
        return False

    def read_chunk(self) -> str:
        start = self.handle.tell()
        data = self.handle.read(self.chunk_bytes)
        self.eof = not data
        try:
            fresh = self.decoder.decode(data, final=self.eof)
        except UnicodeDecodeError as error:
            raise XmasError(f"{self.path}: not UTF-8 text near byte {start + error.start} ({error.reason})") from None
        if self.first and fresh:
            self.first = False
            if fresh.startswith("\ufeff"):  # a UTF-8 byte-order mark: 3 bytes, not part of the JSON
                fresh, self.byte = fresh[1:], 3
        return fresh

    def byte_length(self, start: int, end: int) -> int:
        return end - start if self.ascii else len(self.text[start:end].encode("utf-8"))

    def advance(self, to: int) -> None:
        self.byte += self.byte_length(self.pos, to)
        self.pos = to

    def skip_whitespace(self) -> bool:
        """Move to the next non-blank character, reading on as needed; False at the end of the file.
        ``skipped_a_newline`` tells whether a line ended on the way."""
        self.skipped_a_newline = False
        while True:
            blank = WHITESPACE.match(self.text, self.pos)
            self.skipped_a_newline |= "\n" in blank.group()
            self.advance(blank.end())
            if self.pos < len(self.text):
                return True
            if not self.refill():
                return False

    def where(self, position: int) -> str:
        """``line L, column C`` of a position in the current text (1-based, as the json module counts)."""
        newlines = self.text.count("\n", 0, position)
        line = self.lines_before + newlines + 1
        column = position - self.text.rfind("\n", 0, position) if newlines else self.column_base + position + 1
        return f"line {line}, column {column}"

    def fail(self, position: int, message: str) -> XmasError:
        return XmasError(f"{self.path}: not valid JSON at {self.where(position)}: {message}")


def iter_spans(path: str | Path, chunk_bytes: int = CHUNK_BYTES, convert: Callable = as_llava) -> Iterator[Span]:
    """The records of a JSON list or of JSON Lines, one at a time, with their byte spans in the file, each
    as ``convert`` reads it (by default as a LLaVA record, :func:`xmas.data.records.as_llava`).

    Holds one chunk of text (plus the record being read) in memory, never the whole file. Invalid
    JSON raises :class:`XmasError` naming the file, line and column.
    """
    path = Path(path)
    if not path.is_file():
        raise XmasError(f"{path}: annotation file not found")
    cursor = _Cursor(path, chunk_bytes)
    try:
        if not cursor.skip_whitespace():
            raise cursor.fail(cursor.pos, "the file is empty")
        first = cursor.text[cursor.pos]
        if first not in "[{":
            raise XmasError(
                f"{path}: expected a JSON list of records or JSON Lines, found {kind_of(first)} "
                f"at {cursor.where(cursor.pos)}"
            )
        records = list_records(cursor) if first == "[" else line_records(cursor)
        for index, (record, offset, length) in enumerate(records):
            yield Span(index, offset, length, convert(record))
    finally:
        cursor.close()


def list_records(cursor: _Cursor) -> Iterator[tuple[object, int, int]]:
    """(record, byte offset, byte length) of each record of a JSON list."""
    decoder = json.JSONDecoder()
    cursor.advance(cursor.pos + 1)
    index = 0
    while True:
        if not cursor.skip_whitespace():
            raise cursor.fail(cursor.pos, "the file ends before the list is closed with ']'")
        if index == 0 and cursor.text[cursor.pos] == "]":
            cursor.advance(cursor.pos + 1)
            break
        record, end = decode_one(cursor, decoder)
        start_byte = cursor.byte
        cursor.advance(end)
        yield record, start_byte, cursor.byte - start_byte
        index += 1
        if not cursor.skip_whitespace():
            raise cursor.fail(cursor.pos, "the file ends before the list is closed with ']'")
        separator = cursor.text[cursor.pos]
        cursor.advance(cursor.pos + 1)
        if separator == "]":
            break
        if separator != ",":
            raise cursor.fail(cursor.pos - 1, f"expected ',' or ']' after record {index - 1}")
    if cursor.skip_whitespace():
        raise cursor.fail(cursor.pos, "extra data after the closing ']' of the list")


def line_records(cursor: _Cursor) -> Iterator[tuple[object, int, int]]:
    """(record, byte offset, byte length) of each record of JSON Lines: one JSON value per line (validation
    excludes one that is not an object, as in a list)."""
    decoder = json.JSONDecoder()
    while cursor.pos < len(cursor.text) or cursor.skip_whitespace():
        record, end = decode_one(cursor, decoder)
        start_byte = cursor.byte
        cursor.advance(end)
        yield record, start_byte, cursor.byte - start_byte
        if cursor.skip_whitespace() and not cursor.skipped_a_newline:
            raise cursor.fail(cursor.pos, "expected one record per line (JSON Lines), found more on this line")


def decode_one(cursor: _Cursor, decoder: json.JSONDecoder) -> tuple[object, int]:
    """Decode the value at the cursor, reading more of the file while the value runs past the buffer."""
    while True:
        try:
            record, end = decoder.raw_decode(cursor.text, cursor.pos)
        except json.JSONDecodeError as error:
            cut = error.msg.startswith("Unterminated string") or error.pos >= len(cursor.text) - CUT_MARGIN
            if cut and cursor.refill():
                continue
            raise cursor.fail(error.pos, error.msg) from None
        # a number at the very end of the buffer may go on in the next chunk
        if end == len(cursor.text) and cursor.refill():
            continue
        return record, end


def kind_of(first_char: str) -> str:
    return {"{": "an object", '"': "a string", "t": "a boolean", "f": "a boolean", "n": "null"}.get(
        first_char, "a number" if first_char in "-0123456789" else f"{first_char!r}"
    )


def read_all(path: str | Path) -> list:
    return [span.record for span in iter_spans(path)]


class SourceRecords(Sequence):
    """Records of an annotation file, read on demand at the byte spans ``prepare`` recorded.

    ``rows`` (uid, index, offset, length) fixes which records and in what order. Each record read is
    checked against its uid, so an annotation file changed after ``prepare`` fails loudly instead
    of feeding the wrong records.
    """

    def __init__(self, path: str | Path, rows: pd.DataFrame, convert: Callable = as_llava):
        self.path = Path(path)
        self.convert = convert
        self.uids = rows["uid"].tolist()
        self.indices = rows["index"].tolist()
        self.offsets = rows["offset"].tolist()
        self.lengths = rows["length"].tolist()
        self._handle = None

    def __len__(self) -> int:
        return len(self.uids)

    def raw(self, position: int) -> bytes:
        """The record's bytes exactly as they are in the file (checked to be that record)."""
        return self._read(position)[0]

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self[i] for i in range(*position.indices(len(self)))]
        return self._read(position)[1]

    def _read(self, position: int) -> tuple[bytes, object]:
        if self._handle is None:
            if not self.path.is_file():
                raise XmasError(f"{self.path}: annotation file not found")
            self._handle = open(self.path, "rb")
        self._handle.seek(self.offsets[position])
        data = self._handle.read(self.lengths[position])
        if len(data) != self.lengths[position]:
            raise self.changed(position, "the file is shorter")
        try:
            record = self.convert(json.loads(data))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise self.changed(position, "the bytes there are not one JSON record") from None
        if not matches_uid(record, self.indices[position], self.uids[position]):
            found = record.get("id") if isinstance(record, dict) else record
            raise self.changed(position, f"the record there has id {found!r}")
        return data, record

    def changed(self, position: int, why: str) -> XmasError:
        return XmasError(
            f"{self.path} changed after `xmas prepare` indexed it: record {self.indices[position]} "
            f"(uid {self.uids[position]!r}) was at byte {self.offsets[position]}, but {why}; "
            "run prepare again"
        )

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> SourceRecords:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
