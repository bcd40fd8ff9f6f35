"""Today's model families as proxy (a training segment, trajectories, the loss baseline) and as target (a full
and a LoRA fine-tune, a resumed one, evaluation), on their stand-ins."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from xmas.data.examples import shard_slice, usable_image_examples
from xmas.io import write_parquet, write_records
from xmas.models.checkpoints import load_checkpoint, load_target
from xmas.models.encoding import ConversationEncoder
from xmas.models.families import FAMILIES
from xmas.models.recipe import is_projector, is_vision_tower
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages.evaluate import evaluate_exact_match
from xmas.stages.prepare import prepare
from xmas.stages.train_segment import train_segment
from xmas.stages.trajectory import extract_shard
from xmas.training import finetune as finetuning
from xmas.training.loop import encode_share

from conftest import MODERN_FAMILIES, varied_records

pytestmark = [pytest.mark.parametrize("family", list(MODERN_FAMILIES)), pytest.mark.slow]
RECORDS = varied_records()  # 6 image records, 2 text-only
SEGMENT = stage_defaults(
    "train-segment",
    epochs=1,
    batch_size=4,
    checkpoints=2,
    learning_rate=1e-3,
    warmup_ratio=0.0,
    freeze_vision_tower=True,
)
TRAJECTORY = stage_defaults("trajectory", batch_size=3, chunk_size=4)
LORA = stage_defaults(
    "finetune-target",
    epochs=1,
    batch_size=4,
    learning_rate=1e-3,
    projector_learning_rate=1e-3,
    warmup_ratio=0.0,
    lora_r=4,
    lora_alpha=8,
    lora_dropout=0.0,
)


def changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def state(model) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_the_proxy_trains_a_segment_then_gives_trajectories_and_losses(
    family, modern_checkpoints, varied_data, tmp_path
):
    checkpoint = modern_checkpoints[family]
    examples = prepare(
        varied_data["train"], varied_data["images"], stage_defaults("prepare"), 1, StageStats("t"), checkpoint
    )
    write_parquet(examples, tmp_path / "examples.parquet")
    trained = tmp_path / "checkpoint-1"
    train_segment(
        checkpoint,
        trained,
        1,
        SEGMENT,
        tmp_path / "examples.parquet",
        varied_data["train"],
        varied_data["images"],
        StageStats("t"),
    )
    updated = changed(state(load_checkpoint(checkpoint)[0]), state(load_checkpoint(trained)[0]))
    family_ = FAMILIES[family]
    assert any(is_projector(name, family_) for name in updated) and any(".layers." in name for name in updated)
    assert not any(is_vision_tower(name, family_) for name in updated)  # frozen; its projector trains

    shard = shard_slice(usable_image_examples(tmp_path / "examples.parquet"), 0, 1)
    for signal, column in (("attention", "sv1"), ("loss", "loss")):
        out = tmp_path / f"{signal}.parquet"
        extract_shard(
            trained, 1, shard, varied_data["train"], varied_data["images"], out, TRAJECTORY, signal, StageStats("t")
        )
        values = pd.read_parquet(out)
        assert values.uid.tolist() == shard.uid.tolist() and len(values) == 6
        assert (values[column] > 0).all() and values[column].notna().all()


def test_records_of_several_images_go_through_prepare_training_and_trajectories(
    family, modern_checkpoints, varied_data, tmp_path
):
    images = sorted(path.name for path in varied_data["images"].iterdir())
    question = [{"from": "human", "value": "<image>\n<image>\nSame colour?"}, {"from": "gpt", "value": "No."}]
    several = [{"id": f"pair-{n}", "image": images[n : n + 2], "conversations": question} for n in range(3)]
    records = [*RECORDS, *several]
    write_records(records, tmp_path / "train.json")
    checkpoint = modern_checkpoints[family]
    settings = stage_defaults("prepare", max_images=2)
    examples = prepare(tmp_path / "train.json", varied_data["images"], settings, 1, StageStats("t"), checkpoint)
    assert (examples.status == "ok").all()
    write_parquet(examples, tmp_path / "examples.parquet")
    trained = tmp_path / "checkpoint-1"
    train_segment(checkpoint, trained, 1, SEGMENT, tmp_path / "examples.parquet", tmp_path / "train.json",
                  varied_data["images"], StageStats("t"))  # fmt: skip
    shard = shard_slice(usable_image_examples(tmp_path / "examples.parquet"), 0, 1)
    out = tmp_path / "attention.parquet"
    extract_shard(trained, 1, shard, tmp_path / "train.json", varied_data["images"], out, TRAJECTORY, "attention",
                  StageStats("t"))  # fmt: skip
    values = pd.read_parquet(out).set_index("uid")
    assert {"pair-0", "pair-1", "pair-2"} <= set(values.index) and (values.sv1 > 0).all()


@pytest.fixture
def subset(tmp_path):
    write_records(RECORDS, tmp_path / "subset.json")
    return tmp_path / "subset.json"


def test_a_full_fine_tune_trains_all_but_the_vision_tower(family, modern_checkpoints, varied_data, subset, tmp_path):
    settings = dataclasses.replace(LORA, lora_r=0, freeze_vision_tower=True)
    finetuning.finetune(
        modern_checkpoints[family], subset, varied_data["images"], tmp_path / "full", settings, 0, StageStats("t")
    )
    before, after = state(load_checkpoint(modern_checkpoints[family])[0]), state(load_target(tmp_path / "full")[0])
    updated, family_ = changed(before, after), FAMILIES[family]
    assert any(is_projector(name, family_) for name in updated) and any(".layers." in name for name in updated)
    assert not any(is_vision_tower(name, family_) for name in updated)


class Interrupted(Exception):
    pass


def test_a_lora_fine_tune_cut_short_resumes_to_the_same_adapter_and_is_evaluated(
    family, modern_checkpoints, varied_data, subset, tmp_path, monkeypatch
):
    base, images = modern_checkpoints[family], varied_data["images"]
    settings = dataclasses.replace(LORA, save_every_steps=1)  # 8 records in batches of 4: 2 steps
    finetuning.finetune(base, subset, images, tmp_path / "straight", settings, 0, StageStats("t"))

    save_partial = finetuning.save_partial

    def save_then_stop(*args, **kwargs):
        save_partial(*args, **kwargs)
        raise Interrupted  # as a job killed right after its first save

    monkeypatch.setattr(finetuning, "save_partial", save_then_stop)
    with pytest.raises(Interrupted):
        finetuning.finetune(base, subset, images, tmp_path / "resumed", settings, 0, StageStats("t"))
    monkeypatch.undo()
    stats = StageStats("t")
    finetuning.finetune(base, subset, images, tmp_path / "resumed", settings, 0, stats)
    assert stats.as_dict()["counts"]["resumed_at_step"] == 1
    straight, resumed = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[key], resumed[key]) for key in straight)

    test = tmp_path / "test.json"
    write_records([record for record in RECORDS if "image" in record][:3], test)
    scores, predictions = evaluate_exact_match(tmp_path / "resumed", test, images, 2, 4, StageStats("t"))
    assert scores.n.sum() == 3 and len(predictions) == 3 and predictions.answer.map(type).eq(str).all()


def test_a_share_without_images_gets_a_blank_image_row_that_adds_nothing_to_the_loss(
    family, modern_checkpoints, varied_data
):
    """What DeepSpeed needs: every process runs the vision tower and projector in every micro-batch."""
    model, processor = load_checkpoint(modern_checkpoints[family])
    encoder = ConversationEncoder.of_checkpoint(modern_checkpoints[family], processor, varied_data["images"])
    text_only = [record for record in RECORDS if "image" not in record]
    plain, filled = encode_share(encoder, text_only, False), encode_share(encoder, text_only, True)
    assert "pixel_values" not in plain and "pixel_values" in filled and len(filled["input_ids"]) == 3
    with torch.no_grad():
        torch.testing.assert_close(model(**filled).loss, model(**plain).loss)
