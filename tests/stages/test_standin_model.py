"""Rule standin_model: offline stand-ins with the real models' tokenizer classes and files, processor
settings and checkpoint layouts."""

from __future__ import annotations

import json

import torch

from xmas.cli import main


def test_vicuna_stand_in_is_a_sentencepiece_tokenizer_that_adds_bos_and_has_no_pad(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "vicuna"
    assert main(["standin-model", "--name", "vicuna-7b-v1.5", "--out", str(folder)]) == 0
    assert (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").exists()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and config["add_bos_token"] is True
    tokenizer = AutoTokenizer.from_pretrained(folder)  # converts tokenizer.model: needs sentencepiece, protobuf
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id == 1
    assert tokenizer.pad_token is None
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, as the real checkpoint
    assert AutoModelForCausalLM.from_pretrained(folder).config.dtype == torch.float16


def test_stablelm_zephyr_stand_in_pads_with_its_endoftext_and_carries_zephyrs_chat_template(tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "stablelm"
    assert main(["standin-model", "--name", "stablelm-2-zephyr-1_6b", "--out", str(folder)]) == 0
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("Hi")["input_ids"][0] != tokenizer.bos_token_id  # no BOS added
    assert tokenizer.pad_token == tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert chat == "<|user|>\nHi<|endoftext|>\n"


def test_clip_stand_in_resizes_and_crops_with_openais_settings_and_the_projector_has_llavas_keys(tmp_path):
    from transformers import AutoImageProcessor

    clip, projector = tmp_path / "clip", tmp_path / "projector"
    assert main(["standin-model", "--name", "clip-vit-large-patch14-336", "--out", str(clip)]) == 0
    processor = AutoImageProcessor.from_pretrained(clip)
    assert processor.do_center_crop and processor.crop_size == {"height": 56, "width": 56}
    assert list(processor.image_mean) == [0.48145466, 0.4578275, 0.40821073] and processor.resample == 3
    name = "llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5"
    assert main(["standin-model", "--name", name, "--out", str(projector)]) == 0
    weights = torch.load(projector / "mm_projector.bin", weights_only=True)
    assert sorted(weights) == [f"model.mm_projector.{layer}.{kind}" for layer in (0, 2) for kind in ("bias", "weight")]
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
