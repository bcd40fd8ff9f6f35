"""How a stage starts on a job's GPUs: ``xmas <stage>`` on one, ``accelerate launch ... -m xmas <stage>``
(one process per GPU) on several, and on several nodes one ``accelerate launch`` per node through ``srun``.
Free of torch, so that building the DAG stays light."""

from __future__ import annotations

# The config's precisions by accelerate's names; the stage's Accelerator is given the same (engine.py).
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

# Inside a Slurm job of several nodes: the first node hosts the rendezvous, on a port of the job's own, so that
# jobs sharing that node do not collide; each node's launcher says its own rank (srun's task on it).
HEAD_NODE = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
JOB_PORT = "$((29500 + SLURM_JOB_ID % 20000))"
NODE_RANK = '"$SLURM_NODEID"'


def accelerate_arguments(
    gpus: int, precision: str, nodes: int = 1, head: str = HEAD_NODE, port: str = JOB_PORT, rank: str = NODE_RANK
) -> list[str]:
    """``accelerate launch``'s options for ``gpus`` processes on each of ``nodes`` machines. One node: the
    rendezvous on a free port (as torchrun --standalone). Several: every node's launcher meets the others at
    ``head:port`` (torchrun's c10d rendezvous numbers the processes); ``rank`` is the node's (accelerate checks
    the port on the first node only)."""
    meeting = (
        ["--main_process_port", "0"]
        if nodes == 1
        else ["--rdzv_backend", "c10d", "--main_process_ip", head, "--main_process_port", port, "--machine_rank", rank]
    )
    return [
        "--multi_gpu", "--num_machines", str(nodes), "--num_processes", str(gpus * nodes), *meeting,
        "--mixed_precision", MIXED_PRECISION[precision], "--dynamo_backend", "no",
    ]  # fmt: skip


def launcher_prefix(gpus: int, precision: str = "fp32", nodes: int = 1) -> list[str]:
    """The command that starts a stage on ``gpus`` GPUs on each of ``nodes`` nodes: ``xmas`` for one process;
    else one process per GPU; on several nodes, one launcher per node (``srun``, one task per node, inside the
    job's allocation), its options expanded on its node (``bash -c``: the node's rank is its task's)."""
    if gpus <= 1 and nodes == 1:
        return ["xmas"]
    launch = ["accelerate", "launch", *accelerate_arguments(max(gpus, 1), precision, nodes), "-m", "xmas"]
    if nodes == 1:
        return launch
    per_node = " ".join([*launch, '"$@"'])
    return ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "bash", "-c", f"'exec {per_node}'", "xmas"]
