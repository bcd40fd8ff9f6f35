"""The shared GPU/distributed machinery: names, launch command lines, batch shares, and a real 2-process run."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch

from xmas.errors import XmasError
from xmas.models.checkpoints import load_checkpoint
from xmas.models.encoding import ConversationEncoder
from xmas.settings import stage_defaults
from xmas.training.engine import (
    MicroBatch,
    Training,
    attention_implementation,
    context_from_environment,
    deepspeed_config,
    flash_attention_installed,
    fsdp_plugin,
    resolve_dtype,
    strategy_of,
    training,
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


def test_deepspeed_presets_fill_what_accelerate_cannot():
    """The micro-batch size and accumulation (accelerate reads them off a DataLoader; our data order is our own)
    and ZeRO-3's bucket sizes (accelerate reads a top-level hidden size, a VLM's is its language model's)."""
    settings = dataclasses.replace(SETTINGS, batch_size=32, micro_batch_size=4, precision="bf16", deepspeed="zero3")
    config = deepspeed_config(settings, world_size=4, hidden_size=64)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 2)
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert config["train_batch_size"] == "auto" and config["bf16"]["enabled"] == "auto"  # accelerate's to fill


def test_deepspeed_config_errors_name_the_file(tmp_path):
    with pytest.raises(XmasError, match="'zero4' is neither zero2 nor zero3"):
        deepspeed_config(dataclasses.replace(SETTINGS, deepspeed="zero4"), 1)
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    with pytest.raises(XmasError, match=r"ds\.json: cannot fill 'auto' for zero_optimization\.reduce_bucket_size"):
        deepspeed_config(dataclasses.replace(SETTINGS, deepspeed=str(custom)), 1)


def test_accelerate_fills_the_rest_of_a_deepspeed_preset_in_one_process(tiny_checkpoint, monkeypatch):
    """One process, no launcher: the engine sets up a process group of one for DeepSpeed, and accelerate fills the
    global batch, the clipping and the precision from the settings."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = dataclasses.replace(
        SETTINGS, batch_size=8, micro_batch_size=4, precision="bf16", max_grad_norm=0.5, deepspeed="zero2"
    )
    model, _ = load_checkpoint(tiny_checkpoint)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with training(settings, model.config) as run:
        run.prepare(model, optimizer, scheduler)
        config = run.accelerator.deepspeed_config
        assert str(run.accelerator.distributed_type) == "DistributedType.DEEPSPEED"
    assert "LOCAL_RANK" not in os.environ  # the process group of one, and its variables, end with the block
    assert config["train_batch_size"] == 8 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 0.5 and config["bf16"]["enabled"] is True and not config["fp16"]["enabled"]


def test_deepspeed_requested_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as on a machine without it: the import fails
    with pytest.raises(XmasError, match=r'DeepSpeed is not installed: pip install -e "\.\[gpu\]"'):
        Training(dataclasses.replace(SETTINGS, deepspeed="zero2"))


def test_one_way_to_shard_at_a_time():
    assert strategy_of(SETTINGS) == "ddp" and strategy_of(dataclasses.replace(SETTINGS, fsdp="full_shard")) == "fsdp"
    with pytest.raises(XmasError, match=r"deepspeed \(zero3\) and fsdp \(full_shard\) are both set"):
        strategy_of(dataclasses.replace(SETTINGS, deepspeed="zero3", fsdp="full_shard"))


@pytest.mark.parametrize(("choice", "reshards"), [("full_shard", True), ("shard_grad_op", False)])
def test_fsdp_shards_every_layer_of_the_model_as_its_setting_says(choice, reshards, tiny_checkpoint):
    """FSDP runs on GPUs only (accelerate has no FSDP on CPUs; tests/gpu/check.sh runs it): here, what accelerate is
    given and which modules its wrap policy makes shard units of."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin = fsdp_plugin(dataclasses.replace(SETTINGS, fsdp=choice, gradient_checkpointing=True))
    assert (plugin.fsdp_version, plugin.reshard_after_forward, plugin.activation_checkpointing) == (2, reshards, True)
    model, _ = load_checkpoint(tiny_checkpoint)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [type(module).__name__ for module in model.modules() if policy(module)]
    assert set(units) == {"LlamaDecoderLayer", "CLIPEncoderLayer", "CLIPVisionEmbeddings"}, units  # the model's own
    assert units.count("LlamaDecoderLayer") == model.config.text_config.num_hidden_layers
    assert units.count("CLIPEncoderLayer") == model.config.vision_config.num_hidden_layers


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_fsdp_without_a_gpu_is_a_clear_error():
    with pytest.raises(XmasError, match=r"fsdp full_shard: accelerate shards with FSDP on GPUs only"):
        Training(dataclasses.replace(SETTINGS, fsdp="full_shard"))


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
    run = Training(dataclasses.replace(SETTINGS, precision=precision))
    run.prepare(model, optimizer, scheduler)
    computed = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, output: computed.append(output.dtype))
    before = head.weight.detach().clone()
    loss = run.train_step([MicroBatch(inputs)], torch.tensor(label_tokens(inputs)))
    assert computed == [computed_in] and torch.isfinite(loss)
    assert head.weight.dtype == torch.float32 and not torch.equal(head.weight, before)
