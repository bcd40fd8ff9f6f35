"""Segmented proxy training: resumable, and the chain equals one uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from xmas.errors import XmasError
from xmas.io import seal_path
from xmas.models.checkpoints import load_checkpoint
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages.train_segment import train_segment

SETTINGS = stage_defaults("train-segment", epochs=1, batch_size=24, checkpoints=3, learning_rate=2e-3, warmup_ratio=0.1)


def train(previous, out, checkpoint, small_demo, small_examples, **overrides):
    train_segment(
        previous,
        out,
        checkpoint,
        dataclasses.replace(SETTINGS, **overrides),
        small_examples,
        small_demo["train"],
        small_demo["images"],
        StageStats("t"),
    )


def weights(checkpoint):
    return load_file(checkpoint / "model.safetensors")


@pytest.fixture(scope="module")
def chain(tiny_checkpoint, small_demo, small_examples, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    previous = tiny_checkpoint
    for c in (1, 2, 3):
        train(previous, root / f"checkpoint-{c}", c, small_demo, small_examples)
        previous = root / f"checkpoint-{c}"
    return root


def test_chain_of_segments_equals_one_uninterrupted_run(chain, tiny_checkpoint, small_demo, small_examples, tmp_path):
    train(tiny_checkpoint, tmp_path / "straight", 1, small_demo, small_examples, checkpoints=1)  # all 10 steps
    chained, straight = weights(chain / "checkpoint-3"), weights(tmp_path / "straight")
    assert chained.keys() == straight.keys()
    for name in chained:
        torch.testing.assert_close(chained[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)
    initial = weights(tiny_checkpoint)
    assert any(not torch.equal(initial[name], chained[name]) for name in initial), "training changed nothing"


def test_checkpoints_are_standard_hf_folders_with_state(chain):
    model, processor = load_checkpoint(chain / "checkpoint-2")
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor.chat_template
    state = torch.load(chain / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert state["step"] == 7  # round(2 * 10 / 3): 240 records / 24 per batch = 10 steps
    log = json.loads((chain / "checkpoint-2" / "training_log.json").read_text())
    assert log["first_step"] == 3 and len(log["losses"]) == 4


def test_resuming_with_other_settings_is_refused(chain, small_demo, small_examples, tmp_path):
    with pytest.raises(XmasError, match=r"learning_rate: 0\.002 -> 0\.01"):
        train(chain / "checkpoint-1", tmp_path / "c2", 2, small_demo, small_examples, learning_rate=1e-2)


def test_a_trained_checkpoint_without_its_training_state_is_refused(chain, small_demo, small_examples, tmp_path):
    copied = tmp_path / "checkpoint-1"
    shutil.copytree(chain / "checkpoint-1", copied)
    (copied / "training_state.pt").unlink()
    expected = rf"{copied}/training_state.pt is missing.*delete {copied} and run snakemake again"
    with pytest.raises(XmasError, match=expected):  # its training log shows it was trained
        train(copied, tmp_path / "again-1", 1, small_demo, small_examples)
    (copied / "training_log.json").unlink()
    with pytest.raises(XmasError, match=expected):  # only checkpoint 0, the previous of segment 1, has none
        train(copied, tmp_path / "c2", 2, small_demo, small_examples)
    assert not (tmp_path / "c2").exists()


def test_frozen_vision_tower_does_not_change(tiny_checkpoint, small_demo, small_examples, tmp_path):
    train(tiny_checkpoint, tmp_path / "frozen", 1, small_demo, small_examples, freeze_vision_tower=True)
    before, after = weights(tiny_checkpoint), weights(tmp_path / "frozen")
    vision = [name for name in before if "vision_tower" in name]
    assert vision and all(torch.equal(before[n], after[n]) for n in vision)
    assert any(not torch.equal(before[n], after[n]) for n in before if "language_model" in n)


@pytest.mark.parametrize("name", ["training_state.pt", "model.safetensors"])
def test_a_cut_short_checkpoint_file_is_named_with_the_command_that_redoes_it(
    chain, small_demo, small_examples, tmp_path, name
):
    copied, path = tmp_path / "checkpoint-1", tmp_path / "checkpoint-1" / name
    shutil.copytree(chain / "checkpoint-1", copied)
    shutil.copyfile(seal_path(chain / "checkpoint-1"), seal_path(copied))
    path.write_bytes(path.read_bytes()[:1000])
    damaged = rf"{re.escape(str(copied))} is damaged: {re.escape(str(path))} holds 1000 bytes, \d+ were written"
    with pytest.raises(XmasError, match=rf"{damaged}.*redo it with: snakemake --force {re.escape(str(copied))} "):
        train(copied, tmp_path / "c2", 2, small_demo, small_examples)
    seal_path(copied).unlink()  # copied by hand: no seal, and the failed read names the file
    unreadable = {
        "training_state.pt": rf"{re.escape(str(path))} is damaged: it cannot be read as a torch file",
        "model.safetensors": rf"{re.escape(str(copied))} is damaged: it cannot be loaded \(SafetensorError",
    }
    with pytest.raises(XmasError, match=unreadable[name]):
        train(copied, tmp_path / "c2", 2, small_demo, small_examples)
    assert not (tmp_path / "c2").exists()
