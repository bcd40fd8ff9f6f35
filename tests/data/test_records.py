"""Record validation and the LLaVA → chat-message mapping, and the encoder's labels."""

from __future__ import annotations

import pytest
import torch

from xmas.data.annotations import read_all
from xmas.data.records import InvalidRecord, as_llava, check_conversation, to_messages
from xmas.models.checkpoints import load_checkpoint
from xmas.models.encoding import IGNORE_INDEX


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


def test_the_image_moves_to_the_front_of_its_turn_as_llava_does():
    record = {"conversations": turns("What is it?\n<image>", "a cat ", "And the colour? ", "grey")}
    messages = to_messages(record)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    # LLaVA: value.replace("<image>", "").strip(), then "<image>\n" + value; other turns untouched
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]
    assert messages[1]["content"] == [{"type": "text", "text": "a cat "}]
    assert messages[2]["content"] == [{"type": "text", "text": "And the colour? "}]
    assert to_messages({"conversations": turns("<image>", "x")})[0]["content"] == [{"type": "image"}]


def test_keep_leaves_the_image_where_the_record_has_it():
    record = {"conversations": turns("Look: <image> What is it?", "a cat")}
    assert to_messages(record, "keep")[0]["content"] == [
        {"type": "text", "text": "Look: "},
        {"type": "image"},
        {"type": "text", "text": " What is it?"},
    ]


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


def test_labels_cover_exactly_the_assistant_turns(tiny_checkpoint, tiny_encoder, small_demo):
    model, processor = load_checkpoint(tiny_checkpoint)
    records = read_all(small_demo["train"])
    two_turn = next(r for r in records if len(r["conversations"]) == 4)
    text_only = next(r for r in records if "image" not in r)
    batch = tiny_encoder([two_turn, text_only])
    tokenizer = processor.tokenizer
    for row, record in enumerate([two_turn, text_only]):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        expected = " ".join(f"{turn['value']} </s>" for turn in record["conversations"][1::2]).lower()
        assert tokenizer.decode(labelled) == expected
    image_positions = batch["input_ids"] == tiny_encoder.image_token_id
    assert image_positions[0].sum() == 64 and image_positions[1].sum() == 0
    assert torch.all(batch["labels"][image_positions] == IGNORE_INDEX)
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)
    assert torch.isfinite(model(**batch).loss)


def test_sharegpt_records_read_as_the_llava_records_they_stand_for():
    messages = [{"role": "user", "content": "<image><image>Same?"}, {"role": "assistant", "content": "no"}]
    llava_turns = [{"from": "human", "value": "<image><image>Same?"}, {"from": "gpt", "value": "no"}]
    two = as_llava({"id": "x", "messages": messages, "images": ["a.png", "b.png"], "source": "s"})
    assert two == {"id": "x", "source": "s", "conversations": llava_turns, "image": ["a.png", "b.png"]}
    one = as_llava({"conversations": llava_turns, "images": ["a.png"]})  # LLaMA-Factory's from/value tags
    assert one == {"conversations": llava_turns, "image": "a.png"}
    text = as_llava({"messages": messages[1:], "images": []})
    assert text == {"conversations": [{"from": "gpt", "value": "no"}]}
    llava = {"id": "y", "image": "a.png", "conversations": llava_turns}
    assert as_llava(llava) is llava and as_llava("not a record") == "not a record"


def test_a_sharegpt_system_turn_is_named_by_validation():
    record = as_llava({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]})
    with pytest.raises(InvalidRecord, match="turn 0 is a system turn") as caught:
        check_conversation(record, 1)
    assert caught.value.reason == "turn_role_unsupported"
