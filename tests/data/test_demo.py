"""The embedded demo dataset: deterministic, redundant by design, with a balanced held-out split."""

from __future__ import annotations

import collections
import filecmp

import yaml

from xmas.data.annotations import read_all
from xmas.data.demo import IMAGE_TYPES, TYPES, generate
from xmas.progress import StageStats

from conftest import REPO


def test_default_settings_meet_the_demo_contract(tmp_path):
    settings = yaml.safe_load((REPO / "xmas/resources/demo/shapes.yaml").read_text())
    paths = {"train": tmp_path / "train.json", "test": tmp_path / "test.json", "images": tmp_path / "images"}
    generate(settings, paths["train"], paths["test"], paths["images"], StageStats("t"))
    train, test = read_all(paths["train"]), read_all(paths["test"])
    assert len(train) >= 2000
    types = collections.Counter(r["question_type"] for r in train)
    assert set(types) == set(TYPES) and len(IMAGE_TYPES) >= 4
    assert types["text"] / len(train) >= 0.05
    assert types.most_common(1)[0][1] >= 3 * sorted(types.values())[-2]  # one type far more frequent
    questions = collections.Counter((r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in train)
    assert sum(n for n in questions.values() if n >= 3) >= 0.3 * len(train)  # groups of near-duplicates
    assert len(set(collections.Counter(r["question_type"] for r in test).values())) == 1  # balanced test split
    for record in train + test:
        assert ("image" in record) == (record["question_type"] != "text")
        assert ("image" not in record) or (paths["images"] / record["image"]).is_file()


def test_generation_is_byte_identical(tmp_path, small_demo):
    from conftest import small_generator_settings

    again = {"train": tmp_path / "train.json", "test": tmp_path / "test.json", "images": tmp_path / "images"}
    generate(small_generator_settings(), again["train"], again["test"], again["images"], StageStats("t"))
    assert filecmp.cmp(again["train"], small_demo["train"], shallow=False)
    assert filecmp.cmp(again["test"], small_demo["test"], shallow=False)
    some_image = read_all(again["train"])[0].get("image") or read_all(again["train"])[1]["image"]
    assert filecmp.cmp(again["images"] / some_image, small_demo["images"] / some_image, shallow=False)
