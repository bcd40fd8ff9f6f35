"""The streaming reader of annotation files: same records as json.load, exact byte spans, clear errors."""

from __future__ import annotations

import json
import re

import pytest

from xmas.data.annotations import iter_spans
from xmas.errors import XmasError

RECORDS = [
    {"id": "a", "conversations": [{"from": "human", "value": "Ünïcødé 東京 😀"}, {"from": "gpt", "value": "ok"}]},
    {"id": 12345678901234567890, "score": -1.5e-3, "flag": True, "none": None, "nested": {"list": [1, [2, [3]]]}},
    "a bare string",
    1234567,
    {"id": "escapes", "text": 'quote " backslash \\ newline \n tab \t unicode \u00e9 \U0001f600'},
    [],
]


def spans_of(text: str, chunk_bytes: int, tmp_path) -> list:
    path = tmp_path / "data.json"
    path.write_bytes(text.encode("utf-8"))
    return list(iter_spans(path, chunk_bytes=chunk_bytes))


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 7, 64, 1 << 20])
@pytest.mark.parametrize("layout", ["compact", "indented", "ascii", "crlf", "jsonl", "jsonl-crlf"])
def test_records_and_byte_spans_match_the_file_at_any_chunk_size(tmp_path, chunk_bytes, layout):
    text = {
        "compact": json.dumps(RECORDS, ensure_ascii=False, separators=(",", ":")),
        "indented": json.dumps(RECORDS, ensure_ascii=False, indent=4),
        "ascii": json.dumps(RECORDS),
        "crlf": "\r\n \t" + json.dumps(RECORDS, ensure_ascii=False, indent=1).replace("\n", "\r\n") + "\r\n",
        "jsonl": "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in RECORDS),
        "jsonl-crlf": "\r\n".join(json.dumps(record) for record in RECORDS) + "\r\n\r\n",
    }[layout]
    spans = spans_of(text, chunk_bytes, tmp_path)
    data = text.encode("utf-8")
    assert [span.record for span in spans] == RECORDS
    assert [span.index for span in spans] == list(range(len(RECORDS)))
    for span in spans:
        assert json.loads(data[span.offset : span.offset + span.length]) == span.record


def test_a_byte_order_mark_and_an_empty_list_are_fine(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"id": "x"}]).encode())
    (span,) = iter_spans(path)
    assert path.read_bytes()[span.offset : span.offset + span.length] == b'{"id": "x"}'
    assert spans_of(" [ ] ", 2, tmp_path) == []


@pytest.mark.parametrize(
    "text",
    [
        '[\n  {"id": "a"},\n  {"id": }\n]',
        '[{"id": "a"}\n {"id": "b"}]',
        '[{"id": "a"},]',
        '[\n{"id": "a"},\n{"id": "b\n"}]',
        '[{"id": tru}]',
        '[{"id": "a"}, {"id": "b"}',
        '[{"id": "a"}, {"id": "b',
        '[{"id": "a"}] trailing',
        "",
    ],
)
@pytest.mark.parametrize("chunk_bytes", [3, 1 << 20])
def test_invalid_json_names_the_file_line_and_column(tmp_path, text, chunk_bytes):
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(text)
    with pytest.raises(XmasError) as caught:
        spans_of(text, chunk_bytes, tmp_path)
    where = re.search(r"data\.json: not valid JSON at line (\d+), column (\d+): ", str(caught.value))
    assert where, caught.value
    assert tuple(map(int, where.groups())) == (reference.value.lineno, reference.value.colno)  # where json points


def test_error_position_counts_lines_across_chunks(tmp_path):
    text = "[\n" + ",\n".join(json.dumps({"id": i, "pad": "x" * 50}) for i in range(200)) + ',\n{"id": oops}\n]'
    with pytest.raises(XmasError, match=r"line 202, column 8"):
        spans_of(text, 64, tmp_path)


def test_json_lines_take_one_record_per_line(tmp_path):
    assert [span.record for span in spans_of('{"id": "a"}', 1 << 20, tmp_path)] == [{"id": "a"}]
    with pytest.raises(XmasError, match=r"line 2, column 13: expected one record per line \(JSON Lines\)"):
        spans_of('{"id": "a"}\n{"id": "b"} {"id": "c"}\n', 3, tmp_path)


def test_not_a_list_and_not_utf8_are_clear_errors(tmp_path):
    with pytest.raises(XmasError, match="expected a JSON list of records or JSON Lines, found a string at line 1"):
        spans_of('"a"', 1 << 20, tmp_path)
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"id": "café"}]'.encode("latin-1"))
    with pytest.raises(XmasError, match="not UTF-8 text near byte 12"):
        list(iter_spans(path))
    with pytest.raises(XmasError, match="annotation file not found"):
        list(iter_spans(tmp_path / "missing.json"))
