"""How a stage starts on a job's GPUs: ``xmas <stage>`` on one, ``torchrun --standalone
--nproc_per_node N -m xmas <stage>`` (one process per GPU) on several. Free of torch, so that
building the DAG stays light."""

from __future__ import annotations


def launcher_prefix(gpus: int) -> list[str]:
    """The command that starts a stage on ``gpus`` GPUs: one process per GPU when there are several."""
    if gpus <= 1:
        return ["xmas"]
    return ["torchrun", "--standalone", "--nproc_per_node", str(gpus), "-m", "xmas"]
