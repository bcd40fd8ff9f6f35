"""The shared GPU/distributed machinery: names, launch command lines, batch shares, and a real 2-process run."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from xmas.errors import XmasError
from xmas.models.checkpoints import load_checkpoint
from xmas.models.encoding import ConversationEncoder
from xmas.settings import stage_defaults
from xmas.training.engine import (
    Distributed,
    MicroBatch,
    attention_implementation,
    context_from_environment,
    deepspeed_config,
    flash_attention_installed,
    prepare_training,
    resolve_dtype,
)
from xmas.training.loop import label_tokens

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


@pytest.mark.parametrize(("precision", "computed_in"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_precision_setting_reaches_the_forward_and_keeps_fp32_weights(
    precision, computed_in, tiny_checkpoint, small_demo
):
    """accelerate runs the forward under autocast in bf16; the weights the optimizer steps stay float32."""
    model, processor = load_checkpoint(tiny_checkpoint)
    encoder = ConversationEncoder.of_checkpoint(tiny_checkpoint, processor, small_demo["images"])
    records = json.loads(small_demo["train"].read_text())[:4]
    inputs = encoder.collate([encoder.encode(record, with_labels=True) for record in records])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    settings = dataclasses.replace(SETTINGS, precision=precision)
    training = prepare_training(model, optimizer, scheduler, Distributed(), settings)
    computed = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, output: computed.append(output.dtype))
    before = head.weight.detach().clone()
    loss = training.train_step([MicroBatch(inputs)], torch.tensor(label_tokens(inputs)))
    assert computed == [computed_in] and torch.isfinite(loss)
    assert head.weight.dtype == torch.float32 and not torch.equal(head.weight, before)
