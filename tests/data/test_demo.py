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


def test_captions_describe_scenes_of_their_own_and_leave_the_splits_as_they_were(tmp_path, small_demo):
    from xmas.data.demo import COLORS

    from conftest import small_generator_settings

    settings = {**small_generator_settings(), "captions": {"records": 30}}
    paths = {"train": tmp_path / "train.json", "test": tmp_path / "test.json", "images": tmp_path / "images"}
    generate(settings, paths["train"], paths["test"], paths["images"], StageStats("t"), tmp_path / "captions.json")
    assert filecmp.cmp(paths["train"], small_demo["train"], shallow=False)
    assert filecmp.cmp(paths["test"], small_demo["test"], shallow=False)
    captions = read_all(tmp_path / "captions.json")
    assert len(captions) == 30
    used = {record["image"] for record in read_all(paths["train"]) + read_all(paths["test"]) if "image" in record}
    for record in captions:
        assert record["image"] not in used and (paths["images"] / record["image"]).is_file()
        question, answer = (turn["value"] for turn in record["conversations"])
        assert question.startswith("<image>\n") and "<image>" not in answer
        count, *objects = [part.strip() for part in answer.split(".") if part.strip()]
        assert count.split()[0] == ["zero", "one", "two", "three"][len(objects)]
        colors = [part.split()[1] for part in objects]
        assert colors == sorted(colors, key=list(COLORS).index)  # a fixed order: each caption has one answer
        assert all(part.split()[-1] in ("left", "right") for part in objects)


def test_every_object_lies_whole_in_a_cell_of_its_own():
    import numpy as np
    import pytest

    from xmas.data.demo import Grid, jitter, random_scene
    from xmas.errors import XmasError

    from conftest import small_generator_settings

    grid = Grid.of(small_generator_settings())
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = random_scene(rng, grid, 3)
        for variant in (scene, jitter(scene, rng, grid)):
            assert len({grid.cell_of(obj) for obj in variant}) == len(variant)
            for obj, original in zip(variant, scene):
                assert grid.cell_of(obj) == grid.cell_of(original)
                row, column = divmod(grid.cell_of(obj), grid.cells)
                for centre, index in ((obj.x, column), (obj.y, row)):
                    assert index * grid.cell <= centre - obj.radius and centre + obj.radius < (index + 1) * grid.cell
                assert obj.side == ("left" if obj.x < grid.size // 2 else "right")
    with pytest.raises(XmasError, match="object_radius 8 needs whole cells of at least 18 px"):
        Grid.of({**small_generator_settings(), "object_radius": 8})
