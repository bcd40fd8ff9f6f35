"""Rule target_init: LLaVA-1.5-7B's checkpoint 0 as its recipe sets it up, from the CLI's options."""

from __future__ import annotations

import json

from xmas.cli import main
from xmas.models.checkpoints import load_checkpoint
from xmas.models.image_tokens import ImageTokens
from xmas.models.presets import chat_template


def test_llava_is_composed_with_vicuna_v1_and_a_mean_colour_pad(standins, small_demo, tmp_path):
    out = tmp_path / "base"
    paths = [f"{hub}={folder}" for hub, folder in standins.items()]
    assert (
        main(
            [
                "target-init",
                "--annotations",
                str(small_demo["train"]),
                "--out",
                str(out),
                "--model",
                "llava-1.5-7b",
                "--max-length",
                "2048",
                "--model-paths",
                *paths,
            ]
        )
        == 0
    )
    model, processor = load_checkpoint(out)
    assert processor.chat_template == chat_template("vicuna_v1")
    assert processor.image_processor.do_pad and processor.tokenizer.pad_token == "<unk>"
    assert json.loads((out / "xmas_encoding.json").read_text()) == {"image_position": "front", "max_length": 2048}
    assert ImageTokens(processor).run(640, 480).image_tokens == 16
    assert type(model.model.language_model).__name__ == "LlamaModel"


def test_the_demo_target_is_built_from_configs(small_demo, tmp_path):
    out = tmp_path / "base"
    assert main(["target-init", "--annotations", str(small_demo["train"]), "--out", str(out)]) == 0
    model, processor = load_checkpoint(out)
    assert model.config.text_config.hidden_size == 192 and processor.chat_template == chat_template("demo")
