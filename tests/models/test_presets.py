"""Model presets: resolution, and the compose kind built from offline stand-ins of the real models."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from xmas.errors import XmasError
from xmas.models.checkpoints import load_checkpoint
from xmas.models.encoding import IGNORE_INDEX, ConversationEncoder, Encoding
from xmas.models.presets import TARGET_PRESETS, chat_template, init_model, load_presets, locate, materialise, resolve
from xmas.progress import StageStats
from xmas.settings import stage_defaults

PRESETS = load_presets()
TARGETS = load_presets(TARGET_PRESETS)
RECORD = {
    "id": "r1",
    "image": "red.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat color is it?"},
        {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "Yes."},
    ],
}
VICUNA = "lmsys/vicuna-7b-v1.5"
CLIP = "openai/clip-vit-large-patch14-336"
PROJECTOR = "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "red.png")
    return root


@pytest.fixture(scope="module")
def composed(standins):
    model, processor = materialise(resolve("llava-1.5-7b", TARGETS), seed=0, paths=standins)
    processor.chat_template = chat_template("vicuna_v1")
    return model, processor


def test_compose_carries_every_pretrained_part(standins, composed):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    model, _ = composed
    llm = LlamaForCausalLM.from_pretrained(standins[VICUNA], dtype=torch.float32)
    llm_weights = llm.model.state_dict()
    for name, tensor in model.model.language_model.state_dict().items():
        if name != "embed_tokens.weight":
            torch.testing.assert_close(tensor, llm_weights[name], msg=name)
    vocab = llm.config.vocab_size
    embeddings = model.model.language_model.embed_tokens.weight
    torch.testing.assert_close(embeddings[:vocab], llm_weights["embed_tokens.weight"])
    vision = CLIPVisionModel.from_pretrained(standins[CLIP]).state_dict()
    for name, tensor in model.model.vision_tower.state_dict().items():
        torch.testing.assert_close(tensor, vision[name], msg=name)
    projector = torch.load(f"{standins[PROJECTOR]}/mm_projector.bin", weights_only=True)
    torch.testing.assert_close(
        model.model.multi_modal_projector.linear_1.weight, projector["model.mm_projector.0.weight"].float()
    )
    torch.testing.assert_close(
        model.model.multi_modal_projector.linear_2.bias, projector["model.mm_projector.2.bias"].float()
    )
    assert model.config.projector_hidden_act == "gelu" and model.config.vision_feature_layer == -2


def test_compose_adds_the_image_token_and_vicunas_pad_token(composed):
    model, processor = composed
    tokenizer = processor.tokenizer
    assert tokenizer.pad_token == tokenizer.unk_token == "<unk>"  # as LLaVA sets it for Vicuna
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model.config.image_seq_length == 16  # (56 / 14)^2 patches; the CLS token is dropped ("default")


def test_composed_target_saves_as_a_standard_checkpoint(composed, images, tmp_path):
    model, processor = composed
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    Encoding("front", 2048).save(tmp_path)
    loaded, loaded_processor = load_checkpoint(tmp_path)
    assert loaded_processor.chat_template == chat_template("vicuna_v1") and loaded.config.image_seq_length == 16
    batch = ConversationEncoder.of_checkpoint(tmp_path, loaded_processor, images)([RECORD])
    assert batch["labels"].ne(IGNORE_INDEX).any()
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_the_paper_presets_follow_their_recipes():
    proxy = resolve("tinyllava-stablelm2-clip336", PRESETS)
    assert proxy["kind"] == "compose" and proxy["language_model"] == "stabilityai/stablelm-2-zephyr-1_6b"
    assert proxy["vision_model"] == CLIP and proxy["vision_feature_layer"] == -2
    assert (proxy["conversation"], proxy["image_preprocessing"]) == ("phi", "native")
    target = resolve("llava-1.5-7b", TARGETS)
    assert target["language_model"] == VICUNA and target["projector_weights"] == f"{PROJECTOR}/mm_projector.bin"
    assert (target["conversation"], target["image_preprocessing"]) == ("vicuna_v1", "pad")
    assert resolve("llava-interleave-qwen-0.5b", PRESETS)["path"] == "llava-hf/llava-interleave-qwen-0.5b-hf"


def test_model_paths_find_repos_and_files_inside_them():
    paths = {VICUNA: "/models/vicuna", PROJECTOR: "/models/projector"}
    assert locate(VICUNA, paths) == "/models/vicuna"
    assert locate(f"{PROJECTOR}/mm_projector.bin", paths) == "/models/projector/mm_projector.bin"
    assert locate(CLIP, paths) == CLIP


def test_projector_weights_with_other_keys_are_refused(standins, tmp_path):
    torch.save({"model.mm_projector.1.weight": torch.zeros(1)}, tmp_path / "bad.bin")
    spec = {**resolve("llava-1.5-7b", TARGETS), "projector_weights": str(tmp_path / "bad.bin")}
    with pytest.raises(XmasError, match=r"bad\.bin: unexpected tensor 'model\.mm_projector\.1\.weight'"):
        materialise(spec, seed=0, paths=standins)


def test_missing_model_names_the_key_and_value(standins):
    spec = resolve("llava-1.5-7b", TARGETS)
    with pytest.raises(XmasError, match=r"language_model '/nowhere/llm' cannot be loaded"):
        materialise({**spec, "language_model": "/nowhere/llm"}, seed=0, paths=standins)
    with pytest.raises(XmasError, match=r"vision_model 'no-such-owner/no-such-model' cannot be loaded"):
        materialise({**spec, "vision_model": "no-such-owner/no-such-model"}, seed=0, paths=standins)


def test_a_composed_model_without_a_conversation_is_refused(standins, tmp_path):
    (tmp_path / "train.json").write_text("[]")
    with pytest.raises(XmasError, match="its processor has no chat template; name a conversation"):
        init_model(
            stage_defaults("target-init", model="llava-1.5-7b", conversation="model", model_paths=standins),
            TARGETS,
            [tmp_path / "train.json"],
            tmp_path / "out",
            StageStats("t"),
        )
    with pytest.raises(XmasError, match="conversation 'vicuna' is not one of demo, phi, vicuna_v1, zephyr"):
        chat_template("vicuna")


def test_resolution_precedence_preset_then_folder_then_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-tiny").mkdir()  # a folder with a preset's name: the preset wins
    assert resolve("demo-tiny", PRESETS)["kind"] == "from-config"
    (tmp_path / "my-proxy").mkdir()
    assert resolve("my-proxy", PRESETS) == {"name": "my-proxy", "kind": "pretrained", "path": "my-proxy"}
    assert resolve("llava-hf/llava-interleave-qwen-0.5b-hf", PRESETS)["kind"] == "pretrained"
    with pytest.raises(XmasError, match="'./missing' is neither a preset .*tinyllava-stablelm2-clip336"):
        resolve("./missing", PRESETS)


def test_unknown_kind_and_from_config_without_records_are_clear_errors():
    with pytest.raises(XmasError, match="unknown kind 'magic'"):
        materialise({"name": "x", "kind": "magic"}, seed=0)
    with pytest.raises(XmasError, match="trains its tokenizer on the records"):
        materialise(resolve("demo-tiny", PRESETS), seed=0)


def test_the_demo_targets_position_embeddings_stand_out_from_clips_init(small_demo, tmp_path):
    init_model(
        stage_defaults("target-init", model="demo-target"),
        TARGETS,
        [small_demo["train"]],
        tmp_path / "target",
        StageStats("t"),
    )
    embeddings = load_checkpoint(tmp_path / "target")[0].model.vision_tower.embeddings
    assert TARGETS["demo-target"]["position_embedding_std"] == 1.0
    assert 0.9 < embeddings.position_embedding.weight.std().item() < 1.1  # CLIP's own init: 0.02
