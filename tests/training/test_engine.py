"""The shared GPU/distributed machinery: names, launch command lines, batch shares, and a real 2-process run."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from xmas.errors import XmasError
from xmas.settings import stage_defaults
from xmas.training.engine import (
    Distributed,
    attention_implementation,
    context_from_environment,
    deepspeed_config,
    flash_attention_installed,
    prepare_training,
    resolve_dtype,
)

SETTINGS = stage_defaults("finetune-target", batch_size=24)


def test_dtype_names_from_config_and_cli():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("fp32") is torch.float32 and resolve_dtype("float16") is torch.float16
    with pytest.raises(XmasError, match="'half'.*float32"):
        resolve_dtype("half")


def test_attention_implementation_choice():
    assert attention_implementation("auto", "cpu") == "sdpa"
    assert attention_implementation("eager", "cpu") == "eager"
    with pytest.raises(XmasError, match="'flash'"):
        attention_implementation("flash", "cpu")


@pytest.mark.skipif(flash_attention_installed(), reason="flash-attn is installed here")
def test_flash_attention_without_the_package_says_how_to_install_it():
    with pytest.raises(XmasError, match=r'pip install -e "\.\[gpu\]"'):
        attention_implementation("flash_attention_2", "cuda")


def test_context_from_torchrun_environment():
    assert context_from_environment({}).world_size == 1 and context_from_environment({}).is_main
    context = context_from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert (context.rank, context.world_size, context.local_rank, context.is_main) == (3, 4, 1, False)


def test_deepspeed_presets_fill_their_auto_values():
    settings = dataclasses.replace(SETTINGS, batch_size=32, micro_batch_size=4, precision="bf16", deepspeed="zero3")
    config = deepspeed_config(settings, world_size=4, hidden_size=64)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 2)
    assert config["train_batch_size"] == 32 and config["gradient_clipping"] == 1.0
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    fp16_zero2 = dataclasses.replace(settings, precision="fp16", deepspeed="zero2")
    assert deepspeed_config(fp16_zero2, 1)["fp16"]["enabled"] is True


def test_deepspeed_config_errors_name_the_file(tmp_path):
    with pytest.raises(XmasError, match="'zero4' is neither zero2 nor zero3"):
        deepspeed_config(dataclasses.replace(SETTINGS, deepspeed="zero4"), 1)
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    with pytest.raises(XmasError, match=r"ds\.json: cannot fill 'auto' for zero_optimization\.reduce_bucket_size"):
        deepspeed_config(dataclasses.replace(SETTINGS, deepspeed=str(custom)), 1)


def test_deepspeed_requested_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as on a machine without it: the import fails
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(XmasError, match=r'DeepSpeed is not installed: pip install -e "\.\[gpu\]"'):
        prepare_training(model, optimizer, None, Distributed(), dataclasses.replace(SETTINGS, deepspeed="zero2"))
