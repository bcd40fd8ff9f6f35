"""The shared GPU/distributed machinery: names, launch command lines, batch shares, and a real 2-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, reduced_project, snakemake
from xmas.engine import (Distributed, context_from_environment, deepspeed_config, flash_attention_installed,
                         launch_command, main, prepare_training, rank_micro_batches, resolve_dtype,
                         attention_implementation)
from xmas.errors import XmasError
from xmas.stage import StageStats
from xmas.train import train_segment

SETTINGS = {"epochs": 1, "batch_size": 24, "checkpoints": 3, "seed": 0, "learning_rate": 2e-3,
            "weight_decay": 0.0, "warmup_ratio": 0.1, "max_grad_norm": 1.0, "freeze_vision_tower": False}


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


def test_launch_command_lines():
    stage = ["train-segment", "--checkpoint", "1"]
    assert launch_command(0, stage) == ["xmas", *stage]
    assert launch_command(1, stage) == ["xmas", *stage]
    assert launch_command(4, stage) == ["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "xmas", *stage]


def test_launcher_cli_prints_the_command(capsys):
    assert main(["--gpus", "2", "--print", "train-segment", "--checkpoint", "1"]) == 0
    assert capsys.readouterr().out.strip() == "torchrun --standalone --nproc_per_node 2 -m xmas train-segment --checkpoint 1"


def test_rule_launches_one_process_per_gpu(tmp_path):
    project = reduced_project(tmp_path)
    config_file = project / "config/config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["training"].update(gpus=2, precision="bf16", gradient_checkpointing=True, deepspeed="zero2")
    config_file.write_text(yaml.safe_dump(config))
    out = snakemake(project, "-n", "--printshellcmds", "--cores", "2", "results/proxy/checkpoint-1").stdout
    assert "torchrun --standalone --nproc_per_node 2 -m xmas train-segment --checkpoint 1" in out
    assert "--precision bf16" in out and "--gradient-checkpointing" in out and "--deepspeed zero2" in out


def test_rank_shares_cover_the_batch_with_equal_call_counts():
    indices = np.arange(10, 23)  # 13 examples over 4 ranks in micro-batches of 2
    shares = [rank_micro_batches(indices, rank, 4, 2) for rank in range(4)]
    assert {len(share) for share in shares} == {2}  # every rank makes the same number of calls
    assert sorted(np.concatenate([m for share in shares for m in share]).tolist()) == indices.tolist()
    small = [rank_micro_batches(np.arange(3), rank, 4, None) for rank in range(4)]
    assert [len(share[0]) for share in small] == [1, 1, 1, 0]  # the last rank runs a weight-0 filler


def test_deepspeed_presets_fill_their_auto_values():
    settings = {"batch_size": 32, "micro_batch_size": 4, "max_grad_norm": 1.0, "precision": "bf16", "hidden_size": 64}
    config = deepspeed_config("zero3", settings, world_size=4)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 2)
    assert config["train_batch_size"] == 32 and config["gradient_clipping"] == 1.0
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["stage"] == 3 and config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert deepspeed_config("zero2", {**settings, "precision": "fp16"}, 1)["fp16"]["enabled"] is True


def test_deepspeed_config_errors_name_the_file(tmp_path):
    with pytest.raises(XmasError, match="'zero4' is neither zero2 nor zero3"):
        deepspeed_config("zero4", SETTINGS, 1)
    custom = tmp_path / "ds.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    with pytest.raises(XmasError, match=r"ds\.json: cannot fill 'auto' for zero_optimization\.reduce_bucket_size"):
        deepspeed_config(str(custom), SETTINGS, 1)


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed")
def test_deepspeed_requested_without_the_package_is_a_clear_error():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(XmasError, match=r'DeepSpeed is not installed: pip install -e "\.\[gpu\]"'):
        prepare_training(model, optimizer, None, Distributed(), {**SETTINGS, "deepspeed": "zero2"})


def single_process(previous, out, small_demo, small_examples, **overrides):
    train_segment(previous, out, 1, {**SETTINGS, **overrides}, small_examples, small_demo["train"],
                  small_demo["images"], StageStats("t"))
    return load_file(out / "model.safetensors")


def test_micro_batches_give_the_same_step_as_whole_batches(tiny_checkpoint, small_demo, small_examples, tmp_path):
    whole = single_process(tiny_checkpoint, tmp_path / "whole", small_demo, small_examples)
    accumulated = single_process(tiny_checkpoint, tmp_path / "micro", small_demo, small_examples, micro_batch_size=7)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-5, msg=name)


def test_two_processes_with_gloo_match_one_process(tiny_checkpoint, small_demo, small_examples, tmp_path):
    """torchrun with 2 CPU processes (gloo), each on its half of every batch, equals one process."""
    out = tmp_path / "ddp"
    stage = ["train-segment", "--checkpoint", "1", "--checkpoints", "3", "--previous", str(tiny_checkpoint),
             "--out", str(out), "--examples", str(small_examples), "--annotations", str(small_demo["train"]),
             "--image-root", str(small_demo["images"]), "--batch-size", "24", "--learning-rate", "2e-3",
             "--warmup-ratio", "0.1", "--no-freeze-vision-tower", "--threads", "1", "--stats", str(tmp_path / "s.json")]
    command = launch_command(2, stage)
    command = [sys.executable, "-m", "torch.distributed.run", *command[1:]]  # torchrun of this interpreter
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "s.json").read_text())["processes"] == 2
    together = single_process(tiny_checkpoint, tmp_path / "one", small_demo, small_examples)
    distributed = load_file(out / "model.safetensors")
    assert distributed.keys() == together.keys()
    for name in together:
        torch.testing.assert_close(distributed[name], together[name], rtol=1e-4, atol=1e-5, msg=name)
    assert json.loads((out / "training_log.json").read_text())["losses"] == pytest.approx(
        json.loads((tmp_path / "one" / "training_log.json").read_text())["losses"], rel=1e-5)
