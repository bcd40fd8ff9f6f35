"""Rule proxy_init: checkpoint 0 set up with the proxy section's conventions, from the CLI's options."""

from __future__ import annotations

import json

from xmas.cli import main
from xmas.models.checkpoints import load_checkpoint
from xmas.models.image_tokens import ImageTokens
from xmas.models.presets import chat_template

STABLELM, CLIP = "stabilityai/stablelm-2-zephyr-1_6b", "openai/clip-vit-large-patch14-336"


def test_the_demo_proxy_takes_its_conversation_and_max_length_from_the_options(small_demo, tmp_path):
    out = tmp_path / "checkpoint-0"
    assert (
        main(
            [
                "proxy-init",
                "--annotations",
                str(small_demo["train"]),
                "--out",
                str(out),
                "--model",
                "demo-tiny",
                "--max-length",
                "300",
                "--image-position",
                "keep",
            ]
        )
        == 0
    )
    encoding = json.loads((out / "xmas_encoding.json").read_text())
    assert encoding == {"image_position": "keep", "max_length": 300}
    _, processor = load_checkpoint(out)
    assert processor.chat_template == chat_template("demo") and ImageTokens(processor).fewest() == 64


def test_the_papers_proxy_is_composed_from_local_copies_named_by_model_paths(standins, small_demo, tmp_path):
    out = tmp_path / "checkpoint-0"
    assert (
        main(
            [
                "proxy-init",
                "--annotations",
                str(small_demo["train"]),
                "--out",
                str(out),
                "--model",
                "tinyllava-stablelm2-clip336",
                "--max-length",
                "2048",
                "--model-paths",
                f"{STABLELM}={standins[STABLELM]}",
                f"{CLIP}={standins[CLIP]}",
            ]
        )
        == 0
    )
    model, processor = load_checkpoint(out)
    assert type(model.model.language_model).__name__ == "StableLmModel"
    assert processor.chat_template == chat_template("phi") and processor.image_processor.do_center_crop
    assert ImageTokens(processor).fewest() == ImageTokens(processor).most() == 16


def test_a_missing_local_copy_is_named(small_demo, tmp_path, capfd):
    code = main(
        [
            "proxy-init",
            "--annotations",
            str(small_demo["train"]),
            "--out",
            str(tmp_path / "c"),
            "--model",
            "tinyllava-stablelm2-clip336",
            "--model-paths",
            f"{STABLELM}={tmp_path / 'nowhere'}",
        ]
    )
    assert code == 1 and f"language_model '{tmp_path / 'nowhere'}' cannot be loaded" in capfd.readouterr().err
