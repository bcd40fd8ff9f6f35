"""Rule pretrain_target: the target's alignment on captions, once, before every fine-tune."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xmas.cli import main
from xmas.data.annotations import read_all
from xmas.data.demo import caption_examples, write_split
from xmas.io import write_records
from xmas.models.checkpoints import FINETUNE_RUN_FILE, load_checkpoint
from xmas.models.families import LLAVA
from xmas.models.recipe import is_projector
from xmas.progress import StageStats

from conftest import small_generator_settings


@pytest.fixture(scope="module")
def captions(small_demo, tmp_path_factory):
    """Twelve captioned scenes of their own, their images beside the small demo's."""
    path = tmp_path_factory.mktemp("captions") / "captions.json"
    rng = np.random.default_rng(0)
    examples = caption_examples({**small_generator_settings(), "captions": {"records": 12}}, rng)
    write_records(write_split("captions-test", examples, small_demo["images"], 64, rng, StageStats("t")), path)
    return path


@pytest.fixture(scope="module")
def base(small_demo, captions, tmp_path_factory):
    """The demo target, its tokenizer learnt from the training records and the captions."""
    out = tmp_path_factory.mktemp("target") / "base"
    assert main(["target-init", "--annotations", str(small_demo["train"]), str(captions), "--out", str(out)]) == 0
    return out


def align(base, captions, small_demo, out, *options) -> dict[str, torch.Tensor]:
    """Run the stage; the weights it changed, by name."""
    assert (
        main(
            [
                "pretrain-target",
                "--base",
                str(base),
                "--captions",
                str(captions),
                "--image-root",
                str(small_demo["images"]),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--batch-size",
                "4",
                *options,
            ]
        )
        == 0
    )
    before, after = load_checkpoint(base)[0].state_dict(), load_checkpoint(out)[0].state_dict()
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_the_tokenizer_knows_every_word_of_the_captions(base, captions):
    tokenizer = load_checkpoint(base)[1].tokenizer
    for record in read_all(captions):
        assert tokenizer.unk_token_id not in tokenizer(record["conversations"][1]["value"])["input_ids"]


def test_all_trains_projector_and_language_model_and_keeps_the_frozen_vision_tower(
    base, captions, small_demo, tmp_path
):
    changed = align(base, captions, small_demo, tmp_path / "aligned", "--trainable", "all")
    assert any(is_projector(name, LLAVA) for name in changed) and any("language_model" in name for name in changed)
    assert not any("vision_tower" in name for name in changed)
    assert (tmp_path / "aligned" / FINETUNE_RUN_FILE).is_file()


def test_all_trains_the_vision_tower_too_when_it_is_not_frozen(base, captions, small_demo, tmp_path):
    changed = align(base, captions, small_demo, tmp_path / "aligned", "--trainable", "all", "--no-freeze-vision-tower")
    assert any("vision_tower" in name for name in changed)


def test_projector_trains_the_projector_alone_as_llava_stage_one(base, captions, small_demo, tmp_path):
    changed = align(base, captions, small_demo, tmp_path / "aligned", "--trainable", "projector")
    assert changed and all(is_projector(name, LLAVA) for name in changed)


def test_a_fine_tune_starts_from_the_aligned_target(base, captions, small_demo, tmp_path):
    align(base, captions, small_demo, tmp_path / "aligned", "--trainable", "projector")
    subset = tmp_path / "subset.json"
    write_records(read_all(small_demo["train"])[:8], subset)
    assert (
        main(
            [
                "finetune-target",
                "--base",
                str(tmp_path / "aligned"),
                "--subset",
                str(subset),
                "--image-root",
                str(small_demo["images"]),
                "--out",
                str(tmp_path / "tuned"),
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    run = json.loads((tmp_path / "tuned" / FINETUNE_RUN_FILE).read_text())
    assert run["base"] == str((tmp_path / "aligned").resolve())


def test_captions_that_do_not_exist_are_named(base, small_demo, tmp_path, capfd):
    missing = tmp_path / "no-captions.json"
    assert (
        main(
            [
                "pretrain-target",
                "--base",
                str(base),
                "--captions",
                str(missing),
                "--image-root",
                str(small_demo["images"]),
                "--out",
                str(tmp_path / "aligned"),
            ]
        )
        == 1
    )
    assert str(missing) in capfd.readouterr().err
