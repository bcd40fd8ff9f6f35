"""Sources in the formats people hold their data in (xmas.data.sources): parquet shards in LLaVA-OneVision's and
The Cauldron's layouts, a save_to_disk folder, LLaMA-Factory's dataset_info.json, all written by the tools
that write them (tests/published.py); their records read as the LLaVA records they stand for, by position,
and their subsets written back in their own format."""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xmas.data.records import EMBEDDED, image_paths
from xmas.data.sources import TABLE_POSITION, llamafactory_entry, logged, open_source
from xmas.errors import XmasError
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages.llamafactory import ENTRY
from xmas.stages.prepare import prepare
from xmas.stages.sample import write_subset

from conftest import sharegpt_of
from published import cauldron_rows, dataset_of, onevision_rows, write_parquet_shards

PREPARE = stage_defaults("prepare")


@pytest.fixture(scope="module")
def demo_records(small_demo) -> list[dict]:
    return json.loads(small_demo["train"].read_text())[:40]


@pytest.fixture(scope="module")
def onevision(demo_records, small_demo, tmp_path_factory):
    """The records as LLaVA-OneVision-Data's parquet: 2 shards, row groups of 8 rows."""
    folder = tmp_path_factory.mktemp("onevision")
    dataset = dataset_of(onevision_rows(demo_records, small_demo["images"]), "onevision")
    write_parquet_shards(dataset, folder / "data", shards=2, rows_per_group=8)
    dataset.save_to_disk(str(folder / "saved"))
    return folder


def test_onevision_parquet_prepares_as_the_json_records_it_holds(
    onevision, demo_records, small_demo, tiny_checkpoint, tmp_path
):
    """Shards read row group by row group: every record at its (shard, row group, row), with the same status
    and token count as the same records read from JSON and image files."""
    (tmp_path / "train.json").write_text(json.dumps(demo_records))
    from_json = prepare(tmp_path / "train.json", small_demo["images"], PREPARE, 2, StageStats("t"), tiny_checkpoint)
    from_parquet = prepare(onevision / "data", None, PREPARE, 2, StageStats("t"), tiny_checkpoint)
    assert from_parquet.uid.tolist() == from_json.uid.tolist()
    assert from_parquet.status.tolist() == from_json.status.tolist() and (from_parquet.status == "ok").all()
    assert from_parquet.tokens.tolist() == from_json.tokens.tolist()
    assert set(from_parquet.source) == {"demo"}  # LLaVA-OneVision's data_source column
    positions = from_parquet[TABLE_POSITION].astype(int)
    assert positions.shard.tolist() == [0] * 20 + [1] * 20
    assert positions.row_group.max() == 2 and positions.row.max() == 7
    assert from_parquet[["offset", "length"]].isna().all().all()


def test_a_save_to_disk_folder_reads_like_the_parquet_of_the_same_dataset(onevision, tiny_checkpoint):
    saved = prepare(onevision / "saved", None, PREPARE, 2, StageStats("t"), tiny_checkpoint)
    shards = prepare(onevision / "data", None, PREPARE, 2, StageStats("t"), tiny_checkpoint)
    columns = ["uid", "status", "tokens", "image"]
    pd.testing.assert_frame_equal(saved[columns], shards[columns])
    assert open_source(onevision / "saved").kind == "arrow"
    # known from the metadata before a row is read: prepare's progress counts towards it
    assert open_source(onevision / "saved").count() == open_source(onevision / "data").count() == len(saved)


def test_later_stages_read_single_records_back_by_position(onevision, tiny_checkpoint, demo_records):
    examples = prepare(onevision / "data", None, PREPARE, 2, StageStats("t"), tiny_checkpoint)
    source = open_source(onevision / "data")
    picked = examples.iloc[[33, 2, 17]]
    with source.reader(picked) as records:
        read = records[:]
    for record, expected in zip(read, [demo_records[33], demo_records[2], demo_records[17]]):
        assert record["conversations"] == expected["conversations"]
        assert Image.open(io.BytesIO(record[EMBEDDED][0])).size == (64, 64)
    moved = picked.assign(row=picked.row.astype(int).map(lambda row: (row + 1) % 8))
    with source.reader(moved) as records, pytest.raises(XmasError, match="changed after `xmas prepare`.*row group"):
        records[0]


@pytest.mark.parametrize("held_as", ["data", "saved"])  # parquet shards, a save_to_disk folder
def test_a_parquet_subset_is_the_selected_rows_in_source_order_that_datasets_loads(
    held_as, onevision, tiny_checkpoint, demo_records, tmp_path
):
    import datasets

    examples = prepare(onevision / held_as, None, PREPARE, 2, StageStats("t"), tiny_checkpoint)
    chosen = examples.uid.iloc[[30, 3, 11, 25]]
    manifest = pd.DataFrame({"uid": examples.uid, "selected": examples.uid.isin(chosen)})
    examples.to_parquet(tmp_path / "examples.parquet")
    assert open_source(onevision / held_as).suffix == ".parquet"
    written = write_subset(
        open_source(onevision / held_as), tmp_path / "examples.parquet", manifest, tmp_path / "s.parquet"
    )
    assert written == 4
    subset = datasets.load_dataset("parquet", data_files=str(tmp_path / "s.parquet"), split="train")
    source = datasets.load_from_disk(str(onevision / "saved"))
    assert subset.features == source.features  # the source's schema, images as Images
    assert subset["id"] == [demo_records[i]["id"] for i in (3, 11, 25, 30)]
    for row, index in zip(subset.cast_column("image", datasets.Image(decode=False)), (3, 11, 25, 30)):
        assert (
            row["image"]["bytes"] == source.cast_column("image", datasets.Image(decode=False))[index]["image"]["bytes"]
        )


def test_cauldron_records_put_their_images_before_the_first_question(demo_records, small_demo, tmp_path):
    """The Cauldron's texts have no <image> tags: a record's images go before its first question, every image
    a column of its attention block; a record with more images than max_images is excluded as too_many_images."""
    second = image_paths(demo_records[1])
    two_images = [number for number, record in enumerate(demo_records[:12]) if image_paths(record)][::4]
    rows = cauldron_rows(demo_records[:12], small_demo["images"], extra_images=dict.fromkeys(two_images, second))
    write_parquet_shards(dataset_of(rows, "cauldron"), tmp_path / "cauldron", shards=1, rows_per_group=4)
    source = open_source(tmp_path / "cauldron")
    records = [found.record for found in source.records()]
    first = records[two_images[0]]
    assert first["conversations"][0]["value"].startswith("<image><image>\n")
    assert len(first[EMBEDDED]) == 2 and first["source"] == "demo"
    assert [turn["value"] for turn in first["conversations"][1::2]] == [
        turn["value"] for turn in demo_records[two_images[0]]["conversations"][1::2]
    ]
    one = prepare(tmp_path / "cauldron", None, PREPARE, 2, StageStats("t"))
    two = prepare(tmp_path / "cauldron", None, stage_defaults("prepare", max_images=2), 2, StageStats("t"))
    assert one.set_index("index").reason.dropna().to_dict() == dict.fromkeys(two_images, "too_many_images")
    assert len(two_images) == 3
    assert (two.status == "ok").all()


def test_bad_embedded_images_exclude_their_record_not_the_shard(demo_records, small_demo, tmp_path, monkeypatch):
    """Checked as the rows stream by, the table built in chunks (of 2 rows here, to cross their bounds)."""
    monkeypatch.setattr("xmas.stages.prepare.CHUNK_ROWS", 2)
    rows = onevision_rows(demo_records[:6], small_demo["images"])
    rows["image"][1] = {"bytes": b"not an image at all", "path": "fake.png"}
    rows["image"][3] = {"bytes": rows["image"][3]["bytes"][:60], "path": "cut.png"}  # a truncated PNG
    rows["image"][4] = {"bytes": bomb(rows["image"][4]["bytes"]), "path": "bomb.png"}
    write_parquet_shards(dataset_of(rows, "onevision"), tmp_path / "data", shards=1)
    for decode in (True, False):  # a bomb is refused even unopened: its header says what it would cost
        examples = prepare(tmp_path / "data", None, stage_defaults("prepare", check_images=decode), 2, StageStats("t"))
        excluded = examples.set_index("index").reason.dropna().to_dict()
        assert (
            excluded == {1: "image_unreadable", 3: "image_unreadable", 4: "image_unreadable"}
            if decode
            else {
                1: "image_unreadable",
                4: "image_unreadable",
            }
        )
        assert "embedded image 0" in examples.detail[1] and "DecompressionBomb" in examples.detail[4]
        assert (examples.status == "ok").sum() == 6 - len(excluded)


def bomb(png: bytes) -> bytes:
    """A PNG whose header claims 60,000 x 60,000 pixels (3.6 gigapixels), its checksum made right."""
    header = bytearray(png)
    header[16:24] = struct.pack(">II", 60_000, 60_000)  # IHDR's width and height
    header[29:33] = struct.pack(">I", zlib.crc32(bytes(header[12:29])))
    return bytes(header)


def test_bad_table_files_are_named_with_their_row_group_and_column(demo_records, small_demo, tmp_path):
    good = tmp_path / "good"
    [shard] = write_parquet_shards(dataset_of(onevision_rows(demo_records[:24], small_demo["images"]), "onevision"),
                                   good, shards=1, rows_per_group=8)  # fmt: skip
    (tmp_path / "text").mkdir()
    (tmp_path / "text/train.parquet").write_text("id,conversations\n1,hello\n")
    with pytest.raises(XmasError, match=r"text/train.parquet: not a parquet file"):
        list(open_source(tmp_path / "text").records())
    with pytest.raises(XmasError, match=r"no column 'dialogue' of messages.*columns: id, image, conversations"):
        list(open_source(good, columns={"messages": "dialogue"}).records())
    with pytest.raises(XmasError, match=r"column 'data_source' is string, not a list of messages"):
        list(open_source(good, columns={"messages": "data_source"}).records())
    with pytest.raises(XmasError, match=r"no column 'picture' \(dataset.columns names it\); its columns: id, image"):
        list(open_source(good, columns={"images": "picture"}).records())
    with pytest.raises(XmasError, match=r"column 'conversations' is list<.*>, not images"):
        list(open_source(good, columns={"images": "conversations"}).records())
    # a corrupt row group: the bytes of row group 1's conversations overwritten
    metadata = pq.ParquetFile(shard).metadata.row_group(1)
    chunk = next(
        metadata.column(i)
        for i in range(metadata.num_columns)
        if metadata.column(i).path_in_schema.startswith("conversations")
    )
    data = bytearray(shard.read_bytes())
    data[chunk.data_page_offset : chunk.data_page_offset + 200] = b"\xff" * 200
    broken = tmp_path / "broken/train.parquet"
    broken.parent.mkdir()
    broken.write_bytes(bytes(data))
    with pytest.raises(XmasError, match=r"broken/train.parquet: row group 1, column 'conversations', cannot be read"):
        list(open_source(broken.parent).records())


def test_a_shard_without_a_column_the_first_has_is_named(demo_records, small_demo, tmp_path):
    first, second = write_parquet_shards(
        dataset_of(onevision_rows(demo_records[:16], small_demo["images"]), "onevision"), tmp_path, rows_per_group=8
    )
    pq.write_table(pq.read_table(second).drop_columns(["image"]), second)
    with pytest.raises(XmasError, match=rf"{second}: no column 'image' \({first}, the first shard, has it\)"):
        list(open_source(tmp_path).records())


def test_text_that_is_not_utf8_excludes_its_record_and_names_the_field(
    demo_records, small_demo, tiny_checkpoint, tmp_path
):
    """Parquet does not check that its strings are UTF-8: a record with bytes that are not is excluded as
    invalid_unicode, the field named; the rest of its row group is read as written."""
    [shard] = write_parquet_shards(
        dataset_of(onevision_rows(demo_records[:16], small_demo["images"]), "onevision"), tmp_path / "data", shards=1
    )
    table = pq.read_table(shard)
    ids, turns = table.column("id").cast(pa.binary()).to_pylist(), table.column("conversations")
    as_bytes = pa.list_(pa.struct([("from", pa.binary()), ("value", pa.binary())]))
    conversations = turns.cast(as_bytes).to_pylist()
    ids[3] = b"record \xff"
    conversations[5][1]["value"] = b"an answer \xc3("
    table = table.set_column(0, "id", pa.array(ids, pa.binary()).view(pa.string()))
    column = table.schema.get_field_index("conversations")
    table = table.set_column(column, "conversations", pa.array(conversations, as_bytes).view(turns.type))
    pq.write_table(table, shard)
    examples = prepare(tmp_path / "data", None, PREPARE, 2, StageStats("t"), tiny_checkpoint)
    excluded = examples[examples.status != "ok"]
    assert excluded.index.tolist() == [3, 5] and set(excluded.reason) == {"invalid_unicode"}
    assert "field ['id']" in excluded.detail[3] and "field ['conversations'][1]['value']" in excluded.detail[5]
    assert examples.uid[3] == "record \\udcff" and (examples.status.drop([3, 5]) == "ok").all()


def test_the_format_is_told_from_the_path_and_named_in_the_log(onevision, small_demo, tmp_path, caplog):
    (tmp_path / "train.jsonl").write_text(json.dumps({"id": "a"}) + "\n")
    with caplog.at_level(logging.INFO, logger="xmas"):
        assert logged(open_source(onevision / "data")).kind == "parquet"
        assert (
            logged(open_source(str(onevision / "data/train-*.parquet"))).files == open_source(onevision / "data").files
        )
        assert logged(open_source(small_demo["train"])).suffix == ".json"
        assert open_source(tmp_path / "train.jsonl").suffix == ".jsonl"
    assert "as parquet, 2 shard(s), messages in 'conversations' (from/value), images in 'image'" in caplog.text
    assert "as a JSON list (each record LLaVA's or ShareGPT's by its keys)" in caplog.text
    with pytest.raises(XmasError, match="dataset.format is parquet, but this is a JSON file"):
        open_source(small_demo["train"], "parquet")
    with pytest.raises(XmasError, match="dataset.format is llava, but this is parquet data"):
        open_source(onevision / "data", "llava")
    with pytest.raises(XmasError, match="no file matches"):
        open_source(str(tmp_path / "nothing-*.parquet"))


def test_a_llamafactory_dataset_info_entry_names_the_file_columns_tags_and_image_folder(demo_records, tmp_path):
    """An entry as LLaMA-Factory's dataset_info.json holds it (tests/stages/test_prepare.py checks ENTRY with
    LLaMA-Factory's own parser), read as its file, its columns and tags, and its folder as the image root."""
    info = {
        "mine": {"file_name": "train.json", **ENTRY},
        "defaults": {"file_name": "train.json", "formatting": "sharegpt"},
        "alpaca": {"file_name": "train.json"},
        "hub": {"hf_hub_url": "lmms-lab/LLaVA-OneVision-Data"},
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    (tmp_path / "train.json").write_text(json.dumps([sharegpt_of(record) for record in demo_records[:3]]))
    entry = llamafactory_entry(tmp_path / "dataset_info.json", "mine")
    assert (entry.annotations, entry.media_dir, entry.format) == (
        str(tmp_path / "train.json"),
        str(tmp_path),
        "sharegpt",
    )
    assert entry.columns == ENTRY["columns"] and entry.tags == ENTRY["tags"]
    source = open_source(entry.annotations, entry.format, entry.columns, entry.tags)
    assert [found.record["conversations"] for found in source.records()] == [
        record["conversations"] for record in demo_records[:3]
    ]
    assert llamafactory_entry(tmp_path / "dataset_info.json", "defaults").columns == {
        "messages": "conversations",
        "images": "images",
    }
    with pytest.raises(XmasError, match="'alpaca' is alpaca data; xmas reads ShareGPT"):
        llamafactory_entry(tmp_path / "dataset_info.json", "alpaca")
    with pytest.raises(XmasError, match="no local file_name \\(it names hf_hub_url\\)"):
        llamafactory_entry(tmp_path / "dataset_info.json", "hub")
    with pytest.raises(XmasError, match="no dataset 'other' \\(it has: mine, defaults, alpaca, hub\\)"):
        llamafactory_entry(tmp_path / "dataset_info.json", "other")


def test_a_json_lines_subset_keeps_its_lines_byte_for_byte(demo_records, small_demo, tmp_path):
    lines = [json.dumps(sharegpt_of(record), ensure_ascii=False) for record in demo_records[:10]]
    (tmp_path / "train.jsonl").write_text("".join(line + "\n" for line in lines))
    examples = prepare(tmp_path / "train.jsonl", small_demo["images"], PREPARE, 2, StageStats("t"))
    examples.to_parquet(tmp_path / "examples.parquet")
    manifest = pd.DataFrame({"uid": examples.uid, "selected": examples.index.isin([1, 4, 8])})
    write_subset(tmp_path / "train.jsonl", tmp_path / "examples.parquet", manifest, tmp_path / "subset.jsonl")
    assert (tmp_path / "subset.jsonl").read_text() == "".join(lines[i] + "\n" for i in (1, 4, 8))


def test_a_table_is_read_a_row_group_at_a_time_as_its_records_are_used(onevision, monkeypatch):
    """Streaming: the first record comes before the second row group is read; each read is one row group."""
    from xmas.data.sources import Shard

    reads = []
    original = Shard.read
    monkeypatch.setattr(
        Shard, "read", lambda shard, *args: reads.append((shard.path.name, args[0])) or original(shard, *args)
    )
    records = open_source(onevision / "data").records()
    next(records)
    assert reads == [("train-00000-of-00002.parquet", 0)]
    rest = list(records)
    assert len(rest) == 39 and len(reads) == len(set(reads)) == 6  # 2 shards x 3 row groups, each read once


def test_a_dataset_dict_folder_is_told_to_name_one_of_its_splits(demo_records, small_demo, tmp_path):
    import datasets

    dataset = dataset_of(onevision_rows(demo_records[:4], small_demo["images"]), "onevision")
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(XmasError, match=rf"a DatasetDict .* name one of its splits .*: {tmp_path}/dict/test, "):
        open_source(tmp_path / "dict")
    assert open_source(tmp_path / "dict" / "train").count() == 4
