"""Proxy presets: resolution, and the compose kind built from tiny pretrained parts saved locally (no downloads)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from xmas.encoding import IGNORE_INDEX, ConversationEncoder
from xmas.errors import XmasError
from xmas.proxy import load_checkpoint, load_presets, materialise, resolve

PRESETS = load_presets()
TEMPLATE = PRESETS["tinyllava-stablelm2-clip336"]["chat_template"]
RECORD = {"id": "r1", "image": "red.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "It is red."},
    {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """A tiny StableLM causal LM with a byte-level BPE tokenizer (no pad token) and a tiny CLIP vision model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerFast,
                              StableLmConfig, StableLmForCausalLM)

    root = tmp_path_factory.mktemp("parts")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>"]
    bpe.train_from_iterator(["What color is it? It is red. Sure? Yes."] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    llm = StableLmForCausalLM(StableLmConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    tokenizer.save_pretrained(root / "llm")
    llm.save_pretrained(root / "llm")
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=24, intermediate_size=48,
                                              num_hidden_layers=2, num_attention_heads=2))
    vision.save_pretrained(root / "vision")
    CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(root / "vision")
    projector = {"model.mm_projector.0.weight": torch.randn(32, 24), "model.mm_projector.0.bias": torch.randn(32),
                 "model.mm_projector.2.weight": torch.randn(32, 32), "model.mm_projector.2.bias": torch.randn(32)}
    torch.save(projector, root / "mm_projector.bin")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "red.png")
    return {"root": root, "llm": llm, "vision": vision, "projector": projector}


def compose_spec(parts, **overrides) -> dict:
    spec = {"name": "tiny-compose", "kind": "compose", "language_model": str(parts["root"] / "llm"),
            "vision_model": str(parts["root"] / "vision"), "projector_weights": str(parts["root"] / "mm_projector.bin"),
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "chat_template": TEMPLATE}
    return {**spec, **overrides}


@pytest.fixture(scope="module")
def composed(parts):
    return materialise(compose_spec(parts), seed=0)


def test_compose_carries_every_pretrained_part(parts, composed):
    model, _ = composed
    llm_weights = parts["llm"].model.state_dict()
    for name, tensor in model.model.language_model.state_dict().items():
        if name != "embed_tokens.weight":
            torch.testing.assert_close(tensor, llm_weights[name], msg=name)
    vocab = parts["llm"].config.vocab_size
    torch.testing.assert_close(model.model.language_model.embed_tokens.weight[:vocab], llm_weights["embed_tokens.weight"])
    for name, tensor in model.model.vision_tower.state_dict().items():
        torch.testing.assert_close(tensor, parts["vision"].state_dict()[name], msg=name)
    projector = model.model.multi_modal_projector
    torch.testing.assert_close(projector.linear_1.weight, parts["projector"]["model.mm_projector.0.weight"])
    torch.testing.assert_close(projector.linear_2.bias, parts["projector"]["model.mm_projector.2.bias"])
    assert model.config.projector_hidden_act == "gelu" and model.config.vision_feature_layer == -2


def test_compose_adds_image_and_pad_tokens(parts, composed):
    model, processor = composed
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) > parts["llm"].config.vocab_size
    assert model.config.image_seq_length == 4  # (28 / 14)^2 patches; the CLS token is dropped ("default")


def test_template_labels_cover_assistant_turns_only(parts, composed):
    model, processor = composed
    batch = ConversationEncoder(processor, parts["root"])([RECORD])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<|user|>\n" + "<image>" * 4 + "\nWhat color is it?<|endoftext|>\n<|assistant|>\n")
    labelled = batch["labels"][0] != IGNORE_INDEX
    assert processor.tokenizer.decode(batch["input_ids"][0][labelled]) == "It is red.<|endoftext|>\nYes.<|endoftext|>\n"
    assert torch.isfinite(model(**batch).loss)


def test_composed_proxy_saves_as_a_standard_checkpoint(parts, composed, tmp_path):
    model, processor = composed
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_checkpoint(tmp_path)
    assert loaded_processor.chat_template == TEMPLATE and loaded.config.image_seq_length == 4
    batch = ConversationEncoder(loaded_processor, parts["root"])([RECORD])
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_projector_weights_with_other_keys_are_refused(parts, tmp_path):
    torch.save({"model.mm_projector.1.weight": torch.zeros(1)}, tmp_path / "bad.bin")
    with pytest.raises(XmasError, match=r"bad\.bin: unexpected tensor 'model\.mm_projector\.1\.weight'"):
        materialise(compose_spec(parts, projector_weights=str(tmp_path / "bad.bin")), seed=0)


def test_missing_model_names_the_key_and_value(parts):
    with pytest.raises(XmasError, match=r"language_model '/nowhere/llm' cannot be loaded"):
        materialise(compose_spec(parts, language_model="/nowhere/llm"), seed=0)
    with pytest.raises(XmasError, match=r"vision_model 'no-such-owner/no-such-model' cannot be loaded"):
        materialise(compose_spec(parts, vision_model="no-such-owner/no-such-model"), seed=0)
    with pytest.raises(XmasError, match="needs 'chat_template'"):
        materialise(compose_spec(parts, chat_template=None), seed=0)


def test_resolution_precedence_preset_then_folder_then_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-tiny").mkdir()  # a folder with a preset's name: the preset wins
    assert resolve("demo-tiny", PRESETS)["kind"] == "from-config"
    (tmp_path / "my-proxy").mkdir()
    assert resolve("my-proxy", PRESETS) == {"name": "my-proxy", "kind": "pretrained", "path": "my-proxy"}
    assert resolve("llava-hf/llava-interleave-qwen-0.5b-hf", PRESETS)["kind"] == "pretrained"
    with pytest.raises(XmasError, match="'./missing' is neither a preset .*tinyllava-stablelm2-clip336"):
        resolve("./missing", PRESETS)


def test_shipped_paper_preset_composes_stablelm2_and_clip336():
    spec = resolve("tinyllava-stablelm2-clip336", PRESETS)
    assert spec["kind"] == "compose" and spec["language_model"] == "stabilityai/stablelm-2-zephyr-1_6b"
    assert spec["vision_model"] == "openai/clip-vit-large-patch14-336" and spec["vision_feature_layer"] == -2
    assert resolve("llava-interleave-qwen-0.5b", PRESETS)["path"] == "llava-hf/llava-interleave-qwen-0.5b-hf"


def test_unknown_kind_and_from_config_without_records_are_clear_errors():
    with pytest.raises(XmasError, match="unknown kind 'magic'"):
        materialise({"name": "x", "kind": "magic"}, seed=0)
    with pytest.raises(XmasError, match="trains its tokenizer on the records"):
        materialise(resolve("demo-tiny", PRESETS), seed=0)
