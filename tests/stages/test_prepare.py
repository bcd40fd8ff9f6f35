"""prepare: every source record kept, bad ones excluded with a reason; stable unique ids."""

from __future__ import annotations

import json
import random

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xmas.data.records import image_paths
from xmas.errors import XmasError
from xmas.io import read_parquet
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages.llamafactory import ENTRY
from xmas.stages.prepare import duplicate_renames, prepare, prepared_chunks, unique_uids, write_examples

from conftest import assert_llamafactory_reads, read_back, sharegpt_of


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
    examples = prepare(write(tmp_path / "data.json", records), images, stage_defaults("prepare"), 2, StageStats("t"))
    assert list(examples.uid) == ["good", "text", "missing", "broken", "good#2", "record-5"]
    assert list(examples.status) == ["ok", "ok", "excluded", "excluded", "excluded", "excluded"]
    assert list(examples.reason.fillna("-")) == [
        "-",
        "-",
        "image_missing",
        "image_unreadable",
        "conversations_empty",
        "record_not_object",
    ]
    assert list(examples.source.fillna("-")) == ["coco", "text", "coco", "coco", "-", "-"]
    assert list(examples["index"]) == list(range(6))


def test_skipping_the_decode_check_keeps_undecodable_images(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = write(tmp_path / "d.json", [{"id": "x", "image": "broken.png", "conversations": turns("<image>", "a")}])
    assert prepare(
        data, tmp_path, stage_defaults("prepare", check_images=False), 1, StageStats("t")
    ).status.tolist() == ["ok"]


def test_malformed_json_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"id": "a"},\n  {"id": }\n]')
    with pytest.raises(XmasError, match=r"bad\.json: not valid JSON at line 3, column 10"):
        prepare(bad, tmp_path, stage_defaults("prepare", check_images=False), 1, StageStats("t"))


def test_demo_examples_table(small_examples):
    table = pd.read_parquet(small_examples)
    assert list(table.columns[:7]) == ["uid", "index", "has_image", "image", "source", "status", "reason"]
    assert table.uid.is_unique and (table.status == "ok").all()


def test_every_exclusion_reason_is_recorded_and_nothing_is_dropped(tmp_path):
    from corpus import bad_records, write_bad_images

    write_bad_images(tmp_path / "images")
    bad = bad_records()
    good = {"id": "good", "image": "bad/ok.png", "conversations": turns("<image> q", "a")}
    records = [good, *[record for record, _ in bad], good]
    examples = prepare(
        write(tmp_path / "d.json", records), tmp_path / "images", stage_defaults("prepare"), 2, StageStats("t")
    )
    assert len(examples) == len(records) and list(examples["index"]) == list(range(len(records)))
    assert list(examples.reason.fillna("ok")) == ["ok", *[reason for _, reason in bad], "ok"]
    assert examples.uid.iloc[-1] == "good#2" and examples.uid.is_unique
    assert examples.loc[examples.status == "excluded", "detail"].notna().all()
    mismatch = {"id": "m", "image": ["a.png", "b.png"], "conversations": turns("<image> one", "a")}
    with_two = prepare(
        write(tmp_path / "m.json", [mismatch]),
        tmp_path,
        stage_defaults("prepare", max_images=2, check_images=False),
        1,
        StageStats("t"),
    )
    assert with_two.reason.tolist() == ["image_tag_count_mismatch"]


def test_vision_flan_task_names_become_the_source(tmp_path):
    (tmp_path / "VQA-E").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "VQA-E" / "1.jpg")
    records = [
        {
            "id": "7",
            "task_name": "VQA-E+image_question_answer",
            "image": "VQA-E/1.jpg",
            "conversations": turns("<image>\nWhat is it?", "a dog"),
        }
    ] * 3
    examples = prepare(write(tmp_path / "flan.json", records), tmp_path, stage_defaults("prepare"), 1, StageStats("t"))
    assert examples.source.tolist() == ["VQA-E+image_question_answer"] * 3
    assert examples.uid.tolist() == ["7", "7#2", "7#3"]  # Vision-Flan repeats ids within a task


def test_many_repeats_of_one_id_stay_unique_and_stable():
    uids = unique_uids([{"id": "same"}] * 5000)
    assert uids[:3] == ["same", "same#2", "same#3"] and uids[-1] == "same#5000" and len(set(uids)) == 5000


def renamed_in_chunks(ids: list[str], size: int) -> list[str]:
    def chunks():
        return (pd.Series(ids[start : start + size], dtype=object) for start in range(0, len(ids), size))

    renames = duplicate_renames(chunks)
    return [renames.get(row, uid) for row, uid in enumerate(ids)]


@pytest.mark.parametrize("seed", range(5))
def test_renames_of_a_streamed_table_are_those_of_the_whole_list(seed):
    """duplicate_renames holds a hash per record and the records that share ids, not every id: it must
    name them as unique_uids does over the whole list, with ids that look like its own suffixes."""
    rng = random.Random(seed)
    pool = ["a", "b", "a#2", "a#2#2", "b#3", "c#1", "a#x", "#", "##2", "7"]
    ids = [rng.choice(pool) if rng.random() < 0.7 else f"u{i}" for i in range(400)]
    expected = unique_uids([{"id": uid} for uid in ids])
    assert renamed_in_chunks(ids, size=rng.randint(1, 50)) == expected
    assert len(set(expected)) == len(ids) and expected != ids


def nulls_as_none(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype(object).where(frame.notna(), None)


def test_the_examples_table_streams_to_its_file_as_it_is_built_in_memory(tmp_path, monkeypatch):
    """write_examples (the stage's path) writes chunk by chunk and renames ids repeated across chunks."""
    monkeypatch.setattr("xmas.stages.prepare.CHUNK_ROWS", 3)
    records = [{"id": ["x", "y", "x#2"][i % 3], "conversations": turns(f"q{i}", "a")} for i in range(10)]
    records[4]["conversations"] = "not a list"
    source, settings = write(tmp_path / "data.json", records), stage_defaults("prepare")
    whole = prepare(source, None, settings, 1, StageStats("t"))
    stats = StageStats("t")
    written = write_examples(prepared_chunks(source, None, settings, 1, stats), tmp_path / "examples.parquet", stats)
    streamed = read_parquet(written)
    pd.testing.assert_frame_equal(nulls_as_none(streamed), nulls_as_none(whole))
    assert streamed.uid.is_unique and streamed.uid[3] == "x#3"  # x#2 is a record's own id, further on
    assert stats.counts["renamed_duplicate_ids"] == 7 and sum(stats.excluded.values()) == 1
    assert pq.ParquetFile(written).num_row_groups == 4


def test_rows_record_each_records_bytes_so_stages_can_seek(tmp_path):
    from xmas.data.annotations import SourceRecords

    records = [
        {"id": "a", "conversations": turns("héllo", "wörld")},
        {"id": "b", "conversations": turns("q", "a")},
        {"id": "a", "conversations": turns("again", "yes")},
    ]
    path = write(tmp_path / "d.json", records)
    examples = prepare(path, tmp_path, stage_defaults("prepare", check_images=False), 1, StageStats("t"))
    data = path.read_bytes()
    for row, record in zip(examples.itertuples(), records):
        assert json.loads(data[row.offset : row.offset + row.length]) == record
    with SourceRecords(path, examples.iloc[[2, 0]]) as reader:
        assert reader[:] == [records[2], records[0]]
        assert reader.raw(1) == data[examples.offset[0] : examples.offset[0] + examples.length[0]]
    path.write_text(json.dumps(records[1:], indent=1))  # the file changes after prepare
    with SourceRecords(path, examples) as reader, pytest.raises(XmasError, match="changed after `xmas prepare`"):
        reader[2]


def test_sharegpt_json_lines_prepare_as_the_llava_records_they_stand_for(
    llamafactory, small_demo, tiny_checkpoint, tmp_path
):
    """LLaMA-Factory's multimodal ShareGPT form as JSON Lines: LLaMA-Factory's own converter reads the file as
    these LLaVA records, and prepare finds the same examples in it, token counts included."""
    text_only = {"id": "sum", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    llava = [*json.loads(small_demo["train"].read_text())[:12], text_only]
    sharegpt = [sharegpt_of(record) for record in llava]
    folder = tmp_path / "sharegpt"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(record) + "\n" for record in sharegpt))
    (folder / "dataset_info.json").write_text(json.dumps({"train": {"file_name": "train.jsonl", **ENTRY}}))
    images = small_demo["images"]
    aligned = read_back(llamafactory, folder, "train", tmp_path, media_dir=images)
    assert len(aligned) == len(llava)
    for record, example in zip(llava, aligned):
        assert_llamafactory_reads(record, example, images)

    settings = stage_defaults("prepare")
    from_llava = prepare(write(tmp_path / "llava.json", llava), images, settings, 2, StageStats("t"), tiny_checkpoint)
    from_sharegpt = prepare(folder / "train.jsonl", images, settings, 2, StageStats("t"), tiny_checkpoint)
    with_images = sum(bool(image_paths(record)) for record in llava)
    assert (from_sharegpt.status == "ok").all() and from_sharegpt.has_image.sum() == with_images > 0
    spans = ["offset", "length"]
    pd.testing.assert_frame_equal(from_sharegpt.drop(columns=spans), from_llava.drop(columns=spans))
