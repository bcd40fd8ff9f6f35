"""How a stage starts on a job's GPUs: one process, `accelerate launch` with one per GPU, one launcher per node."""

from __future__ import annotations

from xmas.training.launch import launcher_prefix

from conftest import REDUCED_DEMO, reduced_project, run_snakemake, snakemake


def test_launch_command_lines():
    assert launcher_prefix(0) == launcher_prefix(1) == ["xmas"]
    command = " ".join(launcher_prefix(4, "bf16"))
    assert command.startswith("accelerate launch --multi_gpu --num_machines 1 --num_processes 4 ")
    assert "--main_process_port 0" in command  # a free port: two jobs on one node do not collide
    assert "--mixed_precision bf16" in command and command.endswith(" -m xmas")


def test_a_job_of_several_nodes_starts_a_launcher_on_each_meeting_at_the_first():
    """tests/training/test_loop.py runs this command (without srun) as two nodes on this machine."""
    prefix = launcher_prefix(4, "bf16", nodes=2)
    assert prefix[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c"] and prefix[-1] == "xmas"
    per_node = prefix[5]
    assert per_node.startswith(
        "'exec accelerate launch --multi_gpu --num_machines 2 --num_processes 8 --rdzv_backend c10d "
        '--main_process_ip "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)" '
    )
    assert '--machine_rank "$SLURM_NODEID"' in per_node and per_node.endswith(' -m xmas "$@"\'')
    assert launcher_prefix(1, nodes=3)[:3] == ["srun", "--nodes=3", "--ntasks-per-node=1"]


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


def test_a_training_rule_of_several_nodes_asks_slurm_for_each_and_runs_only_there(tmp_path):
    target = {**REDUCED_DEMO["target"], "gpus": 4, "nodes": 2}
    project = reduced_project(tmp_path, target=target)
    out = snakemake(project, "-n", "--printshellcmds", "--cores", "2", "results/eval/summary.tsv").stdout
    finetune = out.split("rule finetune_target:")[1]
    # gres is per node where `gpu` is the job's total; an `mpi` job's command starts its own tasks (srun)
    assert "nodes=2, gres=gpu:4, mpi=srun, tasks=2" in finetune.split("Shell command:")[0]
    assert (
        " --num_processes 8 --rdzv_backend c10d " in finetune and "srun --nodes=2 --ntasks-per-node=1 bash" in finetune
    )
    assert ' -m xmas "$@"\' xmas finetune-target --base ' in finetune
    plan = snakemake(project, "--cores", "1", "plan").stdout
    assert "| finetune_target | 1 | 4 | 2 | 8 |" in plan and "| train_segment | 1 | 0 | 1 | 1 |" in plan
    local = run_snakemake(project, "--cores", "1", "results/subset_0.5.json")
    assert local.returncode != 0
    assert "target.nodes is above 1, which needs the Slurm executor (--profile profiles/slurm), not local" in (
        local.stderr
    )
    assert not (project / "results").exists()
