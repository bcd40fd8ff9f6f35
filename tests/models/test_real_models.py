"""The real path on stand-ins of the real models: LLaVA-1.5's and TinyLLaVA's conventions, labels for
every kind of tokenizer, image preprocessing, and records longer than max_length."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from xmas.data.examples import shard_slice, usable_image_examples
from xmas.errors import XmasError
from xmas.io import write_parquet, write_records
from xmas.models import standins as standin_models
from xmas.models.checkpoints import load_checkpoint
from xmas.models.encoding import IGNORE_INDEX, ConversationEncoder
from xmas.models.families import FAMILIES
from xmas.models.presets import TARGET_PRESETS, chat_template, image_processor_for, init_model, load_presets
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages.prepare import prepare
from xmas.stages.trajectory import extract_shard
from xmas.training.finetune import fitting_records

PROXIES = load_presets()
TARGETS = load_presets(TARGET_PRESETS)
VICUNA = "lmsys/vicuna-7b-v1.5"
TWO_TURNS = {
    "id": "two-turns",
    "image": "wide.png",
    "conversations": [
        {"from": "human", "value": "What is the man holding?\n<image>"},
        {"from": "gpt", "value": "A red umbrella."},
        {"from": "human", "value": "Is it raining?"},
        {"from": "gpt", "value": "Yes, it is."},
    ],
}
TEXT_ONLY = {
    "id": "text-only",
    "conversations": [
        {"from": "human", "value": "Explain how a compiler works."},
        {"from": "gpt", "value": "It starts with a simple idea."},
    ],
}
# What LLaVA's own code writes for TWO_TURNS: llava/train/train.py's preprocess_multimodal (the image
# moved to the front of its turn) and conv_vicuna_v1.get_prompt() of llava/conversation.py, run on
# the record (haotian-liu/LLaVA at main); the string is copied from that run's output.
LLAVA_VICUNA_V1 = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is the man "
    "holding? ASSISTANT: A red umbrella.</s>USER: Is it raining? ASSISTANT: Yes, it is.</s>"
)
# The same record through TinyLLaVA_Factory's `phi` template (tinyllava/data/template/phi_template.py
# with base.py's _prompt, as upstream XMAS vendors them), run on the record; copied from its output.
TINYLLAVA_PHI = LLAVA_VICUNA_V1.replace("</s>", "<|endoftext|>")
LLAVA_VICUNA_V1_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions. USER: <image>\n"
    "What is the man holding? ASSISTANT:"
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A wide photo: blue on its left edge, green on its right, red between."""
    root = tmp_path_factory.mktemp("images")
    picture = np.zeros((40, 100, 3), dtype=np.uint8)
    picture[:, :10] = (0, 0, 255)
    picture[:, 10:90] = (255, 0, 0)
    picture[:, 90:] = (0, 255, 0)
    Image.fromarray(picture).save(root / "wide.png")
    return root


def build(model: str, presets: dict, paths: dict, out, annotations, **settings):
    stage = "target-init" if presets is TARGETS else "proxy-init"
    return init_model(
        stage_defaults(stage, model=model, model_paths=paths, **settings), presets, [annotations], out, StageStats("t")
    )


@pytest.fixture(scope="module")
def no_records(tmp_path_factory):
    path = tmp_path_factory.mktemp("annotations") / "none.json"
    path.write_text("[]")
    return path


@pytest.fixture(scope="module")
def llava(standins, no_records, tmp_path_factory):
    """LLaVA-1.5-7B's checkpoint 0 as the workflow builds it, composed from the stand-ins."""
    out = tmp_path_factory.mktemp("llava") / "base"
    build("llava-1.5-7b", TARGETS, standins, out, no_records, max_length=2048)
    return out


@pytest.fixture(scope="module")
def tinyllava(standins, no_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("tinyllava") / "base"
    build("tinyllava-stablelm2-clip336", PROXIES, standins, out, no_records, max_length=2048)
    return out


def labelled_runs(batch, row: int, tokenizer) -> list[str]:
    """The text of each maximal run of labelled tokens in a row."""
    labels = batch["labels"][row]
    runs, current = [], []
    for position, label in enumerate(labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == int(batch["input_ids"][row, position])
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run).strip() for run in runs]


def test_bos_tokenizer_labels_exactly_the_answers_and_their_end_of_turn(llava, images):
    """The case that stopped LLaVA-1.5 fine-tuning: Vicuna's tokenizer adds BOS."""
    model, processor = load_checkpoint(llava)
    encoder = ConversationEncoder.of_checkpoint(llava, processor, images)
    batch = encoder([TWO_TURNS, TEXT_ONLY])
    tokenizer = processor.tokenizer
    assert (batch["input_ids"][:, 0] == tokenizer.bos_token_id).all()
    assert labelled_runs(batch, 0, tokenizer) == ["A red umbrella.</s>", "Yes, it is.</s>"]
    assert labelled_runs(batch, 1, tokenizer) == ["It starts with a simple idea.</s>"]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["attention_mask"][1, -1] == 0  # the shorter row is padded, on the right
    assert torch.isfinite(model(**batch).loss)


def test_a_left_padding_tokenizer_gets_the_same_labels(standins, no_records, images, llava, tmp_path):
    left = tmp_path / "vicuna-left"
    left.mkdir()
    standin_models.vicuna(left, padding_side="left")
    build("llava-1.5-7b", TARGETS, {**standins, VICUNA: str(left)}, tmp_path / "base", no_records, max_length=2048)
    _, processor = load_checkpoint(tmp_path / "base")
    assert json.loads((left / "tokenizer_config.json").read_text())["padding_side"] == "left"
    batch = ConversationEncoder.of_checkpoint(tmp_path / "base", processor, images)([TEXT_ONLY, TWO_TURNS])
    reference = ConversationEncoder.of_checkpoint(llava, image_root=images)([TEXT_ONLY, TWO_TURNS])
    torch.testing.assert_close(batch["labels"], reference["labels"])
    assert labelled_runs(batch, 1, processor.tokenizer) == ["A red umbrella.</s>", "Yes, it is.</s>"]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_tokenizer_without_bos_whose_pad_is_its_eos_labels_each_answer_and_its_endoftext(tinyllava, images):
    model, processor = load_checkpoint(tinyllava)
    tokenizer = processor.tokenizer
    assert tokenizer("Hi")["input_ids"][0] != tokenizer.bos_token_id
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    batch = ConversationEncoder.of_checkpoint(tinyllava, processor, images)([TWO_TURNS, TEXT_ONLY])
    assert labelled_runs(batch, 0, tokenizer) == ["A red umbrella.<|endoftext|>", "Yes, it is.<|endoftext|>"]
    assert labelled_runs(batch, 1, tokenizer) == ["It starts with a simple idea.<|endoftext|>"]
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == tokenizer.eos_token_id).all()
    assert (batch["labels"][padding] == IGNORE_INDEX).all()
    assert torch.isfinite(model(**batch).loss)


def test_vicuna_v1_renders_the_text_llavas_conversation_code_writes(llava, images):
    encoder = ConversationEncoder.of_checkpoint(llava, image_root=images)
    text, spans = encoder.render(TWO_TURNS)
    assert text == LLAVA_VICUNA_V1
    assert [text[start:end] for start, end in spans] == [" A red umbrella.</s>", " Yes, it is.</s>"]
    prompt = encoder.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is the man holding?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == LLAVA_VICUNA_V1_PROMPT


def test_phi_renders_the_text_tinyllavas_template_code_writes(tinyllava, images):
    text, spans = ConversationEncoder.of_checkpoint(tinyllava, image_root=images).render(TWO_TURNS)
    assert text == TINYLLAVA_PHI
    assert [text[start:end] for start, end in spans] == [" A red umbrella.<|endoftext|>", " Yes, it is.<|endoftext|>"]


def test_the_paper_presets_take_each_recipes_conversation_and_image_preprocessing(llava, tinyllava):
    _, target = load_checkpoint(llava)
    _, proxy = load_checkpoint(tinyllava)
    assert target.chat_template == chat_template("vicuna_v1") and proxy.chat_template == chat_template("phi")
    assert target.image_processor.do_pad and not target.image_processor.do_center_crop
    assert proxy.image_processor.do_center_crop  # upstream's "square" is CLIP's own resize and crop


def expected_pixels(picture: Image.Image, image_processor, mode: str) -> np.ndarray:
    """LLaVA's expand2square / TinyLLaVA's resize, then the CLIP resize and normalisation, with PIL."""
    mean, std = np.array(image_processor.image_mean), np.array(image_processor.image_std)
    side = image_processor.size["height"]
    if mode == "pad":
        width, height = picture.size
        square = Image.new("RGB", (max(width, height),) * 2, tuple(int(x * 255) for x in mean))
        square.paste(picture, ((max(width, height) - width) // 2, (max(width, height) - height) // 2))
        picture = square
    resized = np.asarray(picture.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    return ((resized - mean) / std).transpose(2, 0, 1)


@pytest.mark.parametrize("mode", ["pad", "square"])
def test_images_are_padded_or_squashed_to_a_square_not_cropped(standins, images, mode):
    from transformers import AutoImageProcessor

    clip = AutoImageProcessor.from_pretrained(standins["openai/clip-vit-large-patch14-336"])
    picture = Image.open(images / "wide.png").convert("RGB")
    processor = image_processor_for(clip, mode, FAMILIES["llava"])
    pixels = processor(picture, return_tensors="pt")["pixel_values"][0].numpy()
    np.testing.assert_allclose(pixels, expected_pixels(picture, processor, mode), atol=0.05)
    cropped = clip(picture, return_tensors="pt")["pixel_values"][0].numpy()
    blue_left_edge = pixels[2, pixels.shape[1] // 2, 0]
    assert blue_left_edge > 1.0 and cropped[2, cropped.shape[1] // 2, 0] < 0  # crop cuts the sides off
    if mode == "pad":  # the bands above and below are the mean colour: zero once normalised
        assert np.abs(pixels[:, 0, :]).max() < 0.05


def long_records() -> list[dict]:
    words = " ".join(["word"] * 200)
    return [
        TWO_TURNS,
        {
            "id": "long-answer",
            "image": "wide.png",
            "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": words}],
        },
        {
            "id": "late-image",
            "image": "wide.png",
            "conversations": [
                {"from": "human", "value": words},
                {"from": "gpt", "value": "ok"},
                {"from": "human", "value": "<image>\nAnd this?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {"id": "long-text", "conversations": [{"from": "human", "value": words}, {"from": "gpt", "value": words}]},
    ]


@pytest.fixture(scope="module")
def short_context(standins, images, tmp_path_factory):
    """The LLaVA-1.5 stand-in as a proxy with max_length 96, its records prepared and written."""
    root = tmp_path_factory.mktemp("short")
    write_records(long_records(), root / "train.json")
    build("llava-1.5-7b", TARGETS, standins, root / "checkpoint-0", root / "train.json", max_length=96)
    stats = StageStats("prepare")
    examples = prepare(root / "train.json", images, stage_defaults("prepare"), 1, stats, root / "checkpoint-0")
    write_parquet(examples, root / "examples.parquet")
    return root, examples, stats.as_dict()


def test_prepare_counts_tokens_and_excludes_a_record_whose_image_would_be_cut(short_context):
    _, examples, stats = short_context
    status = dict(zip(examples.uid, examples.status))
    assert status == {"two-turns": "ok", "long-answer": "ok", "late-image": "excluded", "long-text": "ok"}
    late = examples.set_index("uid").loc["late-image"]
    assert late.reason == "image_cut_by_max_length" and "max_length 96" in late.detail
    assert stats["excluded"] == {"image_cut_by_max_length": 1}
    assert stats["counts"]["truncated"] == 2 and stats["max_length"] == 96
    tokens = examples.set_index("uid").tokens
    assert tokens["long-answer"] > 96 and tokens["two-turns"] < 96


def test_a_record_longer_than_max_length_is_cut_and_cannot_fail_a_shard(short_context, images):
    root, _, _ = short_context
    encoder = ConversationEncoder.of_checkpoint(root / "checkpoint-0", image_root=images)
    batch = encoder(long_records()[:2])
    assert batch["input_ids"].shape[1] == 96
    assert (batch["input_ids"] == encoder.image_token_id).sum(dim=1).tolist() == [16, 16]
    with pytest.raises(XmasError, match="'late-image': its image does not fit in max_length 96"):
        encoder([long_records()[2]])
    shard = shard_slice(usable_image_examples(root / "examples.parquet"), 0, 1)
    settings = stage_defaults("trajectory", batch_size=2, chunk_size=2)
    stats = StageStats("t")
    extract_shard(
        root / "checkpoint-0",
        1,
        shard,
        root / "train.json",
        images,
        root / "shard.parquet",
        settings,
        "attention",
        stats,
    )
    values = pq.read_table(root / "shard.parquet").to_pandas()
    assert values.uid.tolist() == ["two-turns", "long-answer"] and (values.sv1 > 0).all()


def test_the_target_leaves_out_a_subset_record_it_cannot_fit(short_context, standins, no_records, images, tmp_path):
    root, _, _ = short_context
    write_records(long_records(), tmp_path / "subset.json")
    build("llava-1.5-7b", TARGETS, standins, tmp_path / "target", no_records, max_length=96)
    stats = StageStats("finetune")
    encoder = ConversationEncoder.of_checkpoint(tmp_path / "target")
    with fitting_records(tmp_path / "subset.json", encoder, stats) as records:
        assert [record["id"] for record in records] == ["two-turns", "long-answer", "long-text"]
    assert stats.as_dict()["excluded"] == {"image_cut_by_max_length": 1}
