"""Nothing lost, nothing silent: inputs that used to pass `prepare` and break a later stage, or break
a stage with the wrong explanation, are excluded with a named reason or stopped with a clear error."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xmas.cli import main
from xmas.data.annotations import SourceRecords
from xmas.data.examples import usable_image_examples
from xmas.io import seal_path
from xmas.stages.trajectory import singular_value_columns, trajectory_schema

TURNS = [{"from": "human", "value": "<image>\nWhich color does the square have?"}, {"from": "gpt", "value": "green"}]


def record(uid: str, image, conversations=TURNS, **fields) -> dict:
    return {"id": uid, "image": image, "conversations": conversations, **fields}


def demo_images(small_demo, count: int) -> list[str]:
    return [entry["image"] for entry in json.loads(small_demo["train"].read_text())[:count]]


def write(path, records):
    path.write_text(json.dumps(records, indent=1))
    return path


def run_prepare(annotations, image_root, model, out, *options) -> int:
    return main(
        [
            "prepare",
            "--annotations",
            str(annotations),
            "--image-root",
            str(image_root),
            "--model",
            str(model),
            "--out",
            str(out),
            "--workers",
            "1",
            *options,
        ]
    )


def prepared(annotations, image_root, model, tmp_path, *options) -> pd.DataFrame:
    out = tmp_path / "examples.parquet"
    assert run_prepare(annotations, image_root, model, out, *options) == 0
    return pd.read_parquet(out)


def test_every_image_of_a_list_is_checked_and_the_llava_proxy_takes_one_per_record(
    small_demo, tiny_checkpoint, tiny_encoder, tmp_path
):
    first, second = demo_images(small_demo, 2)
    two_tags = [{"from": "human", "value": "<image><image>\nSame colour?"}, {"from": "gpt", "value": "no"}]
    records = [
        record("one-in-a-list", [first]),
        record("two", [first, second], two_tags),
        record("second-missing", [first, "shapes/nowhere.png"], two_tags),
    ]
    annotations = write(tmp_path / "lists.json", records)
    examples = prepared(annotations, small_demo["images"], tiny_checkpoint, tmp_path, "--max-images", "2")
    assert examples.status.tolist() == ["ok", "excluded", "excluded"]
    assert examples.reason.iloc[1] == "too_many_images"
    assert examples.detail.iloc[1] == "2 images, but llava models take 1 per record (the proxy)"
    assert examples.reason.iloc[2] == "image_missing" and "shapes/nowhere.png" in examples.detail.iloc[2]
    with SourceRecords(annotations, examples[examples.status == "ok"]) as usable:
        batch = tiny_encoder(usable[:], with_labels=True)
    assert batch["pixel_values"].shape[0] == 1


def test_lone_surrogates_are_excluded_as_invalid_unicode(small_demo, tiny_checkpoint, tmp_path):
    image = demo_images(small_demo, 1)[0]
    bad_text = [TURNS[0], {"from": "gpt", "value": "gre\udcffen"}]
    records = [record("good", image), record("bad-id-\udcff", image), record("bad-text", image, bad_text)]
    annotations = write(tmp_path / "surrogates.json", records)
    examples = prepared(annotations, small_demo["images"], tiny_checkpoint, tmp_path)
    assert examples.status.tolist() == ["ok", "excluded", "excluded"]
    assert examples.reason.tolist()[1:] == ["invalid_unicode", "invalid_unicode"]
    assert examples.uid.iloc[1] == "bad-id-\\udcff"  # the id, its surrogate escaped, so it can be stored
    assert examples.detail.iloc[1].startswith("field ['id'] holds a lone surrogate")
    assert examples.detail.iloc[2].startswith("field ['conversations'][1]['value'] holds a lone surrogate")
    # checkpoint 0 is built from the same file before prepare runs: the tokenizer skips the record
    assert (
        main(
            [
                "proxy-init",
                "--annotations",
                str(annotations),
                "--out",
                str(tmp_path / "checkpoint-0"),
                "--model",
                "demo-tiny",
            ]
        )
        == 0
    )


def test_a_conversation_far_longer_than_max_length_is_excluded_as_too_long(small_demo, tiny_checkpoint, tmp_path):
    image = demo_images(small_demo, 1)[0]
    huge = [TURNS[0], {"from": "gpt", "value": "red " * 1_250_000}]  # a 5 MB answer
    long_but_fine = [TURNS[0], {"from": "gpt", "value": "red " * 2000}]  # cut at max_length, as LLaVA does
    records = [record("huge", image, huge), record("long", image, long_but_fine)]
    examples = prepared(write(tmp_path / "long.json", records), small_demo["images"], tiny_checkpoint, tmp_path)
    assert examples.status.tolist() == ["excluded", "ok"]
    assert examples.reason.iloc[0] == "too_long" and "(turn 1: 5000000)" in examples.detail.iloc[0]
    assert examples.tokens.iloc[1] > 512


def test_images_are_checked_where_their_links_lead(small_demo, tiny_checkpoint, tmp_path):
    root = tmp_path / "images"
    (root / "inside").mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(root / "inside" / "real.png")
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (16, 16), "blue").save(outside)
    (root / "inside" / "escape.png").symlink_to(outside)
    (root / "inside" / "alias.png").symlink_to(root / "inside" / "real.png")
    (root / "inside" / "folder.png").mkdir()
    linked_root = tmp_path / "linked-root"
    linked_root.symlink_to(root)  # a linked image root is fine: links are followed on both sides
    records = [record(name, f"inside/{name}.png") for name in ("real", "escape", "alias", "folder")]
    annotations = write(tmp_path / "links.json", records)
    followed = prepared(annotations, linked_root, tiny_checkpoint, tmp_path)
    assert followed.reason.fillna("ok").tolist() == ["ok", "ok", "ok", "image_not_a_file"]
    assert "directory" in followed.detail.iloc[3]
    inside = prepared(annotations, linked_root, tiny_checkpoint, tmp_path, "--image-links", "inside_root")
    assert inside.reason.fillna("ok").tolist() == ["ok", "image_outside_root", "ok", "image_not_a_file"]
    assert str(outside) in inside.detail.iloc[1]


def test_llavas_layout_of_linked_dataset_folders_keeps_every_image(small_demo, tiny_checkpoint, tmp_path):
    """LLaVA's playground/data links coco/, gqa/, ... to where the datasets live (a case of issue 23)."""
    datasets = tmp_path / "datasets"
    for name in ("coco", "gqa"):
        (datasets / name / "train2017").mkdir(parents=True)
        Image.new("RGB", (16, 16), "red").save(datasets / name / "train2017" / "a.jpg")
    root = tmp_path / "playground" / "data"
    root.mkdir(parents=True)
    for name in ("coco", "gqa"):
        (root / name).symlink_to(datasets / name)
    records = [record(name, f"{name}/train2017/a.jpg") for name in ("coco", "gqa")]
    examples = prepared(write(tmp_path / "llava.json", records), root, tiny_checkpoint, tmp_path)
    assert examples.status.tolist() == ["ok", "ok"]


def test_nothing_usable_stops_prepare_with_the_reasons_and_keeps_the_table(
    small_demo, tiny_checkpoint, tmp_path, capfd
):
    records = [record("missing", "shapes/nowhere.png"), record("no-turns", None, []), "not a record"]
    annotations = write(tmp_path / "bad.json", records)
    out, stats = tmp_path / "data" / "examples.parquet", tmp_path / "stats.json"
    assert run_prepare(annotations, small_demo["images"], tiny_checkpoint, out, "--stats", str(stats)) == 1
    error = capfd.readouterr().err
    assert "none of its 3 records is usable" in error and str(annotations) in error
    assert "conversations_empty=1, image_missing=1, record_not_object=1" in error
    assert "record 0 (uid 'missing')" in error
    assert not out.exists()  # no output a later stage could take for a good one
    kept = pd.read_parquet(tmp_path / "data" / "examples.excluded.parquet")
    assert kept.reason.tolist() == ["image_missing", "conversations_empty", "record_not_object"]
    assert json.loads(stats.read_text())["excluded"] == {
        "conversations_empty": 1,
        "image_missing": 1,
        "record_not_object": 1,
    }
    write(annotations, [])
    assert run_prepare(annotations, small_demo["images"], tiny_checkpoint, out) == 1
    assert "holds no records" in capfd.readouterr().err


def run_trajectory(model, examples, annotations, image_root, out, shard: int, shards: int, *options) -> int:
    return main(
        [
            "trajectory",
            "--model",
            str(model),
            "--checkpoint",
            "1",
            "--shard",
            str(shard),
            "--shards",
            str(shards),
            "--examples",
            str(examples),
            "--annotations",
            str(annotations),
            "--image-root",
            str(image_root),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--threads",
            "1",
            *options,
        ]
    )


@pytest.mark.parametrize("records, shards", [(1, 2), (2, 3)], ids=["one-record", "fewer-records-than-shards"])
def test_trajectory_shards_merge_whatever_their_size(tiny_checkpoint, small_demo, tmp_path, records, shards):
    annotations = write(tmp_path / "few.json", json.loads(small_demo["train"].read_text())[:records])
    examples = tmp_path / "examples.parquet"
    assert run_prepare(annotations, small_demo["images"], tiny_checkpoint, examples) == 0
    files = [tmp_path / f"shard-{shard}.parquet" for shard in range(shards)]
    for shard, out in enumerate(files):
        assert run_trajectory(tiny_checkpoint, examples, annotations, small_demo["images"], out, shard, shards) == 0
    empty = next(path for path in files if pq.read_metadata(path).num_rows == 0)
    assert len({pq.read_schema(path).metadata[b"pandas"] for path in files}) == 1  # empty or not, one schema
    merged = tmp_path / "trajectories.parquet"
    merge = ["merge", "--examples", str(examples), "--checkpoints", "1", "--shards", str(shards), "--out", str(merged)]
    assert main([*merge, *map(str, files)]) == 0
    assert pq.read_table(merged).to_pandas().uid.tolist() == usable_image_examples(examples).uid.tolist()
    pq.write_table(trajectory_schema(singular_value_columns(5)).empty_table(), empty)  # as older versions wrote it,
    seal_path(empty).unlink()  # with no seal
    assert main([*merge, *map(str, files)]) == 0


def test_top_k_beyond_the_image_tokens_is_refused_before_any_work(
    tiny_checkpoint, small_demo, small_examples, tmp_path, capfd
):
    out, demo = tmp_path / "shard.parquet", (small_demo["train"], small_demo["images"])
    assert run_trajectory(tiny_checkpoint, small_examples, *demo, out, 0, 60, "--top-k", "65") == 1
    error = capfd.readouterr().err
    assert "trajectory.top_k is 65" in error and "64 image tokens" in error and str(tiny_checkpoint) in error
    assert not out.exists() and not out.with_name(out.name + ".parts").exists()
    assert run_trajectory(tiny_checkpoint, small_examples, *demo, out, 0, 60, "--top-k", "64") == 0
