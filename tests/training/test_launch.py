"""How a stage starts on a job's GPUs: one process, or torchrun with one per GPU."""

from __future__ import annotations

from xmas.training.launch import launcher_prefix

from conftest import REDUCED_DEMO, reduced_project, snakemake


def test_launch_command_lines():
    assert launcher_prefix(0) == launcher_prefix(1) == ["xmas"]
    assert launcher_prefix(4) == ["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "xmas"]


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
    assert "torchrun --standalone --nproc_per_node 2 -m xmas train-segment --checkpoint 1" in out
    assert "--precision bf16" in out and "--gradient-checkpointing" in out and "--deepspeed zero2" in out
