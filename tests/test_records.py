"""Record validation and the LLaVA → chat-message mapping, and the encoder's labels."""

from __future__ import annotations

import pytest
import torch

from xmas.annotations import read_all
from xmas.encoding import IGNORE_INDEX, ConversationEncoder
from xmas.proxy import load_checkpoint
from xmas.records import InvalidRecord, check_conversation, to_messages


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def test_image_tag_becomes_an_image_item_at_its_place():
    record = {"conversations": turns("Look: <image> What is it?", "a cat", "And the colour?", "grey")}
    messages = to_messages(record)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == [{"type": "text", "text": "Look:"}, {"type": "image"},
                                      {"type": "text", "text": "What is it?"}]
    assert messages[1]["content"] == [{"type": "text", "text": "a cat"}]
    tag_first = to_messages({"conversations": turns("<image>\nWhat is it?", "a cat")})
    assert tag_first[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({}, "conversations_missing"),
        ({"conversations": []}, "conversations_empty"),
        ({"conversations": [{"from": "human"}]}, "turn_malformed"),
        ({"conversations": turns("hi", "there")[::-1]}, "turns_not_alternating"),
        ({"conversations": turns("hi", "there", "again")}, "turns_not_alternating"),
        ({"image": "a.png", "conversations": turns("no tag", "x")}, "image_without_tag"),
        ({"conversations": turns("<image> tag", "x")}, "tag_without_image"),
        ({"image": "a.png", "conversations": turns("<image>", "x <image>")}, "image_tag_misplaced"),
        ({"image": ["a.png", "b.png"], "conversations": turns("<image><image>", "x")}, "too_many_images"),
        ({"image": "/etc/passwd", "conversations": turns("<image>", "x")}, "image_path_unsafe"),
        ({"image": "../outside.png", "conversations": turns("<image>", "x")}, "image_path_unsafe"),
        ({"image": 7, "conversations": turns("<image>", "x")}, "image_field_malformed"),
    ],
)
def test_invalid_records_get_their_reason(record, reason):
    with pytest.raises(InvalidRecord) as caught:
        check_conversation(record, max_images=1)
    assert caught.value.reason == reason


def test_valid_record_returns_its_image():
    assert check_conversation({"image": "coco/x.jpg", "conversations": turns("<image> q", "a")}, 1) == ["coco/x.jpg"]
    assert check_conversation({"conversations": turns("q", "a")}, 1) == []


def test_labels_cover_exactly_the_assistant_turns(tiny_checkpoint, small_demo):
    model, processor = load_checkpoint(tiny_checkpoint)
    encoder = ConversationEncoder(processor, small_demo["images"])
    records = read_all(small_demo["train"])
    two_turn = next(r for r in records if len(r["conversations"]) == 4)
    text_only = next(r for r in records if "image" not in r)
    batch = encoder([two_turn, text_only])
    tokenizer = processor.tokenizer
    for row, record in enumerate([two_turn, text_only]):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        expected = " ".join(f"{turn['value']} </s>" for turn in record["conversations"][1::2]).lower()
        assert tokenizer.decode(labelled) == expected
    image_positions = batch["input_ids"] == encoder.image_token_id
    assert image_positions[0].sum() == 64 and image_positions[1].sum() == 0
    assert torch.all(batch["labels"][image_positions] == IGNORE_INDEX)
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)
    assert torch.isfinite(model(**batch).loss)
