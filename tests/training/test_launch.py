"""How a stage starts on a job's GPUs: one process, or `accelerate launch` with one per GPU."""

from __future__ import annotations

from xmas.training.launch import launcher_prefix

from conftest import REDUCED_DEMO, reduced_project, snakemake


def test_launch_command_lines():
    assert launcher_prefix(0) == launcher_prefix(1) == ["xmas"]
    command = " ".join(launcher_prefix(4, "bf16"))
    assert command.startswith("accelerate launch --multi_gpu --num_machines 1 --num_processes 4 ")
    assert "--main_process_port 0" in command  # a free port: two jobs on one node do not collide
    assert "--mixed_precision bf16" in command and command.endswith(" -m xmas")


def test_rule_launches_one_process_per_gpu(tmp_path):
    training = {
        **REDUCED_DEMO["training"],
        "gpus": 2,
        "precision": "bf16",
        "gradient_checkpointing": True,
        "deepspeed": "zero2",
    }
    project = reduced_project(tmp_path, training=training)
    out = snakemake(project, "-n", "--printshellcmds", "--cores", "2", "results/proxy/checkpoint-1").stdout
    assert " --num_processes 2 --main_process_port 0 --mixed_precision bf16 " in out
    assert " --dynamo_backend no -m xmas train-segment --checkpoint 1" in out
    assert "--precision bf16" in out and "--gradient-checkpointing" in out and "--deepspeed zero2" in out
