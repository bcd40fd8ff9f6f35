"""Today's model families on their stand-ins: processors that load without torchvision, image tokens per
image, the capture against eager attention, labels from each family's chat template, pixel bounds."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from xmas.data.records import image_paths
from xmas.errors import XmasError
from xmas.models.attention import CrossModalAttention, top_singular_values
from xmas.models.checkpoints import load_checkpoint, load_processor
from xmas.models.encoding import IGNORE_INDEX, ConversationEncoder
from xmas.models.families import FAMILIES, family_of_model_type
from xmas.models.image_tokens import ImageTokens
from xmas.models.standins import STANDINS, chat_template_of
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages.prepare import prepare

from conftest import MODERN_FAMILIES, VARIED_SIZES, modern_checkpoint, varied_records

# The stand-in of each family's own repo layout, and the text that closes an assistant turn in its template.
FAMILY_STANDIN = {
    "qwen2_5_vl": "Qwen2.5-VL-3B-Instruct",
    "qwen3_vl": "Qwen3-VL-2B-Instruct",
    "idefics3": "SmolVLM-256M-Instruct",
    "smolvlm": "SmolVLM2-256M-Video-Instruct",
    "internvl": "InternVL3-1B-hf",
    "llava_onevision": "llava-onevision-qwen2-0.5b-ov-hf",
    "gemma3": "gemma-3-4b-it",
}
END_OF_TURN = {
    "qwen2_5_vl": "<|im_end|>",
    "qwen3_vl": "<|im_end|>",
    "idefics3": "<end_of_utterance>",
    "smolvlm": "<end_of_utterance>",
    "internvl": "<|im_end|>",
    "llava_onevision": "<|im_end|>",
    "gemma3": "<end_of_turn>",
}
GENERATION_PROMPT = {
    "qwen2_5_vl": "<|im_start|>assistant\n",
    "qwen3_vl": "<|im_start|>assistant\n",
    "idefics3": "Assistant:",
    "smolvlm": "Assistant:",
    "internvl": "<|im_start|>assistant\n",
    "llava_onevision": "<|im_start|>assistant\n",
    "gemma3": "<start_of_turn>model\n",
}
TEMPLATE = {
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "idefics3": "smolvlm",
    "smolvlm": "smolvlm",
    "internvl": "internvl",
    "llava_onevision": "llava_onevision",
    "gemma3": "gemma3",
}
RECORDS = varied_records()
IMAGE_RECORDS = [record for record in RECORDS if "image" in record]
TEXT_ONLY = RECORDS[-1]
TWO_TURNS = next(record for record in IMAGE_RECORDS if len(record["conversations"]) == 4)

pytestmark = pytest.mark.parametrize("family", list(MODERN_FAMILIES))


def standin_folder(standins, family):
    return Path(standins[STANDINS[FAMILY_STANDIN[family]][0]])


def test_every_family_has_a_stand_in_and_these_tests(family, standins):
    assert set(MODERN_FAMILIES) | {"llava"} == set(FAMILIES)
    config = json.loads((standin_folder(standins, family) / "config.json").read_text())
    assert family_of_model_type(config["model_type"]).name == family


def test_the_processor_loads_for_images_from_the_hub_layout_without_torchvision(family, standins):
    from transformers import AutoProcessor

    folder = standin_folder(standins, family)
    has_video = "video_processor" in FAMILIES[family].transformers_class("processor_class").get_attributes()
    if has_video and importlib.util.find_spec("torchvision") is None:
        # what xmas's own loading is there for (an ImportError, or InternVL's ValueError)
        with pytest.raises((ImportError, ValueError), match="(?i)torchvision"):
            AutoProcessor.from_pretrained(folder)
    processor = load_processor(folder)
    assert type(processor).__name__ == FAMILIES[family].processor_class
    assert type(processor.image_processor).__name__ == FAMILIES[family].image_processor_class
    assert processor.chat_template == chat_template_of(TEMPLATE[family])  # the repo's own, from chat_template.json
    config = json.loads((folder / "config.json").read_text())
    column = config.get("image_token_id", config.get("image_token_index"))  # the image features' token
    assert processor.tokenizer.convert_tokens_to_ids(FAMILIES[family].image_token) == column


@pytest.fixture
def encoder(family, modern_checkpoints, varied_data):
    return ConversationEncoder.of_checkpoint(modern_checkpoints[family], image_root=varied_data["images"])


def test_image_tokens_are_counted_per_image_from_its_size_as_the_processor_writes_them(family, encoder):
    lengths = encoder.lengths(RECORDS)
    for record, length in zip(RECORDS, lengths):
        ids = encoder.encode(record, with_labels=False)["input_ids"]
        assert length.tokens == len(ids), record["id"]
        images = (ids == encoder.image_token_id).nonzero().flatten()
        assert length.image_end == (int(images[-1]) + 1 if len(images) else 0), record["id"]
    counts = {size: encoder.images.run(*size).image_tokens for size in VARIED_SIZES}
    if FAMILIES[family].layout != "framed":  # Gemma resizes every image to one size
        assert len(set(counts.values())) > 1, "the image's size must change its tokens in this family"


def test_image_columns_are_the_image_tokens_only(family, encoder):
    """Columns are positions of the image token: tile markers, row separators, vision start/end are not."""
    for width, height in VARIED_SIZES:
        run = encoder.images.run(width, height)
        markers = len(run.ids) - run.image_tokens
        # tiles: each tile's marker; crops: <img> and </img> around them all; framed: Gemma's begin, end, newlines
        assert markers > 0 if FAMILIES[family].layout in ("tiles", "crops", "framed") else markers == 0


@pytest.fixture
def perturbed(family, modern_checkpoints):
    model, processor = load_checkpoint(modern_checkpoints[family])
    torch.manual_seed(1)
    with torch.no_grad():  # far from init, so attention is not near-uniform
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval(), processor


def eager_attention_sum(model, batch):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(**batch, output_attentions=True).attentions
    return sum(layer.sum(dim=1) for layer in attentions)


def test_the_capture_equals_eager_attention_on_a_batch_of_mixed_lengths_and_image_sizes(family, perturbed, encoder):
    model, _ = perturbed
    batch = encoder(IMAGE_RECORDS, with_labels=False)
    assert (batch["attention_mask"] == 0).any()
    reference = eager_attention_sum(model, batch)
    blocks, positions = CrossModalAttention(copy.deepcopy(model)).blocks(batch)
    for row, record in enumerate(IMAGE_RECORDS):
        rows = positions.rows[row][positions.row_valid[row]]
        cols = positions.cols[row][positions.col_valid[row]]
        width, height = Image.open(encoder.image_root / record["image"]).size
        assert len(cols) == encoder.images.run(width, height).image_tokens
        assert (batch["input_ids"][row, cols] == encoder.image_token_id).all()
        after_images = int(batch["attention_mask"][row, cols.max() :].sum()) - 1
        assert int(rows.min()) > int(cols.max()) and len(rows) == after_images
        expected = reference[row][rows][:, cols]
        got = blocks[row, : len(rows), : len(cols)]
        assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) <= 1e-5, record["id"]


def test_the_capture_takes_every_image_of_a_record_with_several(family, perturbed, encoder):
    """Columns are every image token of the record, rows the text after its last image, as eager computes it."""
    model, _ = perturbed
    names = [f"{width}x{height}.png" for width, height in VARIED_SIZES]
    two = [{"from": "human", "value": "<image>\n<image>\nSame colour?"}, {"from": "gpt", "value": "No."}]
    apart = [{"from": "human", "value": "<image>\nThis one, and <image> that?"}, {"from": "gpt", "value": "Both."}]
    records = [
        {"id": "two", "image": names[:2], "conversations": two},
        {"id": "apart", "image": names[1:3], "conversations": apart},
        IMAGE_RECORDS[3],
    ]
    assert [encoder.too_many_images(record) for record in records] == [None] * 3
    batch = encoder(records, with_labels=False)
    reference = eager_attention_sum(model, batch)
    blocks, positions = CrossModalAttention(copy.deepcopy(model)).blocks(batch)
    for row, (record, length) in enumerate(zip(records, encoder.lengths(records))):
        rows = positions.rows[row][positions.row_valid[row]]
        cols = positions.cols[row][positions.col_valid[row]]
        image_tokens = (batch["input_ids"][row] == encoder.image_token_id).nonzero().flatten()
        assert cols.tolist() == image_tokens.tolist()
        sizes = [Image.open(encoder.image_root / path).size for path in image_paths(record)]
        assert len(cols) == sum(encoder.images.run(*size, len(sizes)).image_tokens for size in sizes)
        assert length.image_end == int(cols.max()) + 1
        expected = reference[row][rows][:, cols]
        got = blocks[row, : len(rows), : len(cols)]
        assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) <= 1e-5, record["id"]


def test_an_examples_values_do_not_depend_on_its_batch(family, perturbed, encoder):
    model, _ = perturbed
    attention = CrossModalAttention(model)
    together = top_singular_values(attention.blocks(encoder(IMAGE_RECORDS, with_labels=False))[0], 5)
    for row in (0, 2, 4):
        alone = top_singular_values(attention.blocks(encoder([IMAGE_RECORDS[row]], with_labels=False))[0], 5)
        torch.testing.assert_close(alone[0], together[row], rtol=1e-5, atol=1e-6)


def labelled_runs(batch, row, tokenizer) -> list[str]:
    runs, current = [], []
    for position, label in enumerate(batch["labels"][row].tolist()):
        if label != IGNORE_INDEX:
            assert label == int(batch["input_ids"][row, position])
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run).strip() for run in [*runs, *([current] if current else [])]]


def test_labels_are_exactly_the_answers_with_the_families_end_of_turn(family, encoder):
    batch = encoder([TWO_TURNS, TEXT_ONLY])
    end = END_OF_TURN[family]
    assert labelled_runs(batch, 0, encoder.tokenizer) == [f"A red umbrella.{end}", f"Yes, it is.{end}"]
    assert labelled_runs(batch, 1, encoder.tokenizer) == [TEXT_ONLY["conversations"][1]["value"] + end]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_the_evaluation_prompt_ends_with_the_generation_prompt(family, encoder):
    messages = encoder.messages(TWO_TURNS)[:1]
    item = encoder.prompt(messages, TWO_TURNS)
    text = encoder.tokenizer.decode(item["input_ids"])
    assert text.endswith(GENERATION_PROMPT[family]) and "A red umbrella" not in text
    assert (
        int((item["input_ids"] == encoder.image_token_id).sum())
        == encoder.images.run(*Image.open(encoder.image_root / TWO_TURNS["image"]).size).image_tokens
    )


def test_prepare_counts_each_records_tokens_and_excludes_an_image_cut_by_max_length(
    family, standins, varied_data, encoder, tmp_path
):
    ends = sorted({length.image_end for length in encoder.lengths(IMAGE_RECORDS)})
    max_length = ends[len(ends) // 2]  # about half the images (by where they end) end past it
    checkpoint = modern_checkpoint(family, standins, varied_data["train"], tmp_path / "short", max_length=max_length)
    examples = prepare(
        varied_data["train"], varied_data["images"], stage_defaults("prepare"), 1, StageStats("t"), checkpoint
    )
    lengths = dict(zip([record["id"] for record in RECORDS], encoder.lengths(RECORDS)))
    for row in examples.itertuples():
        assert row.tokens == lengths[row.uid].tokens, row.uid
        cut = lengths[row.uid].image_end >= max_length
        assert (row.status, row.reason) == (("excluded", "image_cut_by_max_length") if cut else ("ok", None)), row.uid
    # where every image ends alike (Gemma's fixed run at the front of its turn), every image record is cut
    kept = 2 if len(ends) == 1 else 4
    assert (examples.reason == "image_cut_by_max_length").sum() >= 2 and (examples.status == "ok").sum() >= kept


def test_pixel_bounds_reach_the_saved_processor_and_bound_each_images_tokens(
    family, standins, varied_data, encoder, tmp_path
):
    layout = FAMILIES[family].layout
    if layout == "dynamic":
        factor = encoder.images.smallest_side()  # one token per factor x factor pixels
        bounds = {"min_pixels": 9 * factor**2, "max_pixels": 16 * factor**2}
        checkpoint = modern_checkpoint(family, standins, varied_data["train"], tmp_path / "bounded", **bounds)
        bounded = ImageTokens(load_processor(checkpoint))
        assert dict(bounded.processor.image_processor.size) == {
            "shortest_edge": 9 * factor**2,
            "longest_edge": 16 * factor**2,
        }
        assert {bounded.run(*size).image_tokens for size in VARIED_SIZES} <= set(range(9, 17))
        assert bounded.run(200, 150).image_tokens < encoder.images.run(200, 150).image_tokens
    elif layout == "framed":
        with pytest.raises(XmasError, match="resizes every image to one size"):
            modern_checkpoint(family, standins, varied_data["train"], tmp_path / "bounded", max_pixels=128 * 128)
    elif layout == "anyres":
        with pytest.raises(XmasError, match="lays every image on one of its grids"):
            modern_checkpoint(family, standins, varied_data["train"], tmp_path / "bounded", max_pixels=128 * 128)
    elif layout == "crops":
        crop = encoder.images.smallest_side()
        checkpoint = modern_checkpoint(
            family, standins, varied_data["train"], tmp_path / "bounded", min_pixels=crop**2 + 1, max_pixels=4 * crop**2
        )
        bounded = ImageTokens(load_processor(checkpoint))
        settings = bounded.processor.image_processor
        assert (settings.min_patches, settings.max_patches) == (2, 4)  # crops of the bounds, the thumbnail beside
        assert bounded.most() == 5 * bounded.processor.image_seq_length < encoder.images.most()
        assert min(bounded.run(*size).image_tokens for size in VARIED_SIZES) == 3 * bounded.processor.image_seq_length
        with pytest.raises(XmasError, match="below one 56x56 crop"):
            modern_checkpoint(family, standins, varied_data["train"], tmp_path / "low", max_pixels=1000)
    else:
        checkpoint = modern_checkpoint(
            family, standins, varied_data["train"], tmp_path / "bounded", max_pixels=128 * 128 + 1
        )
        bounded = ImageTokens(load_processor(checkpoint))
        assert bounded.processor.image_processor.size["longest_edge"] == 128  # two 64 px tiles, not four
        assert bounded.most() < encoder.images.most()
        with pytest.raises(XmasError, match="no lower bound"):
            modern_checkpoint(family, standins, varied_data["train"], tmp_path / "low", min_pixels=1000)
