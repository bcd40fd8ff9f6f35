"""How a stage starts on a job's GPUs: ``xmas <stage>`` on one, ``accelerate launch ... -m xmas <stage>``
(one process per GPU) on several. Free of torch, so that building the DAG stays light."""

from __future__ import annotations

# The config's precisions by accelerate's names; the stage's Accelerator is given the same (engine.py).
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def launcher_prefix(gpus: int, precision: str = "fp32") -> list[str]:
    """The command that starts a stage on ``gpus`` GPUs: one process per GPU when there are several, on one
    node, the rendezvous on a free port (as torchrun --standalone), so jobs sharing a node do not collide."""
    if gpus <= 1:
        return ["xmas"]
    return [
        "accelerate", "launch", "--multi_gpu", "--num_machines", "1", "--num_processes", str(gpus),
        "--main_process_port", "0", "--mixed_precision", MIXED_PRECISION[precision], "--dynamo_backend", "no",
        "-m", "xmas",
    ]  # fmt: skip
