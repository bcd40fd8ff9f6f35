"""Rule demo_data: the shipped generators by name, and the rehearsal's LLaVA-665k-shaped records."""

from __future__ import annotations

import pytest
import yaml
from PIL import Image

from xmas.cli import main
from xmas.data.annotations import read_all

from conftest import REPO


@pytest.fixture(scope="module")
def rehearsal_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    settings = yaml.safe_load((REPO / "xmas/resources/demo/rehearsal.yaml").read_text())
    settings["train"].update(coco=12, gqa=4, ocr_vqa=4, sharegpt=4)
    settings["test"]["per_type"] = 2
    (root / "settings.yaml").write_text(yaml.safe_dump(settings))
    paths = {"train": root / "train.json", "test": root / "test.json", "images": root / "images"}
    assert (
        main(
            [
                "demo-data",
                "--settings",
                str(root / "settings.yaml"),
                "--train-json",
                str(paths["train"]),
                "--test-json",
                str(paths["test"]),
                "--image-root",
                str(paths["images"]),
            ]
        )
        == 0
    )
    return paths


def test_the_rehearsal_set_has_what_llava665k_has(rehearsal_data):
    records = read_all(rehearsal_data["train"])
    images = [record["image"] for record in records if isinstance(record.get("image"), str)]
    assert {image.split("/")[0] for image in images} == {"coco", "gqa", "ocr_vqa"}
    sizes = {Image.open(rehearsal_data["images"] / image).size for image in images}
    assert any(width != height for width, height in sizes)  # photos are not square
    first_turns = [record["conversations"][0]["value"] for record in records if isinstance(record.get("image"), str)]
    assert any(turn.startswith("<image>\n") for turn in first_turns)
    assert any(turn.endswith("<image>") or "\n<image>\n" in turn for turn in first_turns)  # after the question
    assert any(len(record["conversations"]) >= 4 for record in records)  # multi-turn
    assert any("image" not in record for record in records)  # ShareGPT-like text only
    assert any(isinstance(record.get("image"), list) for record in records)  # two images
    assert max(len(turn["value"].split()) for record in records for turn in record["conversations"]) > 2048
    test = read_all(rehearsal_data["test"])
    assert {record["question_type"] for record in test} == {"color", "shape", "count", "ocr", "text"}


def test_a_settings_file_of_an_unknown_kind_is_refused(tmp_path, capfd):
    (tmp_path / "s.yaml").write_text("kind: videos\n")
    code = main(
        [
            "demo-data",
            "--settings",
            str(tmp_path / "s.yaml"),
            "--train-json",
            str(tmp_path / "t.json"),
            "--test-json",
            str(tmp_path / "e.json"),
            "--image-root",
            str(tmp_path / "i"),
        ]
    )
    assert code == 1 and "kind 'videos' is not one of shapes, llava665k-like" in capfd.readouterr().err


def test_a_shipped_generator_is_named_and_a_missing_file_is_clear(tmp_path, capfd):
    code = main(
        [
            "demo-data",
            "--settings",
            "nonesuch",
            "--train-json",
            str(tmp_path / "t.json"),
            "--test-json",
            str(tmp_path / "e.json"),
            "--image-root",
            str(tmp_path / "i"),
        ]
    )
    assert code == 1
    assert "demo settings 'nonesuch': no such file, and not one of shapes, rehearsal" in capfd.readouterr().err


def test_only_the_shape_scenes_write_captions(tmp_path, capfd):
    code = main(
        [
            "demo-data",
            "--settings",
            "rehearsal",
            "--train-json",
            str(tmp_path / "t.json"),
            "--test-json",
            str(tmp_path / "e.json"),
            "--image-root",
            str(tmp_path / "i"),
            "--captions-json",
            str(tmp_path / "c.json"),
        ]
    )
    assert code == 1 and "a llava665k-like dataset has no captions" in capfd.readouterr().err
    assert not (tmp_path / "t.json").exists()
