"""prepare: every source record kept, bad ones excluded with a reason; stable unique ids."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from xmas.errors import XmasError
from xmas.prepare import prepare, unique_uids
from xmas.stage import StageStats


def write(path, records):
    path.write_text(json.dumps(records, indent=1))
    return path


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def test_duplicate_ids_get_stable_suffixes():
    records = [{"id": "a"}, {"id": "b"}, {"id": "a"}, {}, {"id": "a#2"}, {"id": "a"}]
    assert unique_uids(records) == ["a", "b", "a#2", "record-3", "a#2#2", "a#3"]


def test_bad_records_are_excluded_with_reasons(tmp_path):
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "coco" / "ok.png")
    (images / "coco" / "broken.png").write_bytes(b"not a png")
    records = [
        {"id": "good", "image": "coco/ok.png", "conversations": turns("<image> q", "a")},
        {"id": "text", "conversations": turns("q", "a")},
        {"id": "missing", "image": "coco/nope.png", "conversations": turns("<image> q", "a")},
        {"id": "broken", "image": "coco/broken.png", "conversations": turns("<image> q", "a")},
        {"id": "good", "conversations": []},
        "not an object",
    ]
    examples = prepare(write(tmp_path / "data.json", records), images, 1, True, 2, StageStats("t"))
    assert list(examples.uid) == ["good", "text", "missing", "broken", "good#2", "record-5"]
    assert list(examples.status) == ["ok", "ok", "excluded", "excluded", "excluded", "excluded"]
    assert list(examples.reason.fillna("-")) == ["-", "-", "image_missing", "image_unreadable",
                                                  "conversations_empty", "record_not_object"]
    assert list(examples.source.fillna("-")) == ["coco", "text", "coco", "coco", "-", "-"]
    assert list(examples["index"]) == list(range(6))


def test_skipping_the_decode_check_keeps_undecodable_images(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = write(tmp_path / "d.json", [{"id": "x", "image": "broken.png", "conversations": turns("<image>", "a")}])
    assert prepare(data, tmp_path, 1, False, 1, StageStats("t")).status.tolist() == ["ok"]


def test_malformed_json_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"id": "a"},\n  {"id": }\n]')
    with pytest.raises(XmasError, match=r"bad\.json: not valid JSON at line 3, column 10"):
        prepare(bad, tmp_path, 1, False, 1, StageStats("t"))


def test_demo_examples_table(small_examples):
    table = pd.read_parquet(small_examples)
    assert list(table.columns[:7]) == ["uid", "index", "has_image", "image", "source", "status", "reason"]
    assert table.uid.is_unique and (table.status == "ok").all()
