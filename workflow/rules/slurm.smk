# Under profiles/slurm: when the cluster refuses the account or partition of the jobs, say how to
# name them. Unless told, the plugin guesses the account from recent jobs and takes the default
# partition, and sbatch's own error does not say where to set them.
import sys

SLURM_REFUSALS = ("Invalid account", "invalid partition", "No partition specified")


def slurm_refused_account_or_partition(snakemake_logs):
    texts = [Path(path).read_text() for path in snakemake_logs if Path(path).is_file()]
    return any(refusal in text for refusal in SLURM_REFUSALS for text in texts)


onerror:
    if slurm_refused_account_or_partition(log):
        print(
            "Slurm refused the jobs' account or partition: this cluster wants them named. Set them"
            " for profiles/slurm with `export SBATCH_ACCOUNT=<account> SBATCH_PARTITION=<partition>`"
            " (and XMAS_GPU_PARTITION=<partition> if GPU jobs go elsewhere), then run snakemake"
            " again; `sacctmgr show associations user=$USER` and `sinfo -s` list yours.",
            file=sys.stderr,
        )


# A training job of several nodes starts one launcher per node through srun: only inside a Slurm allocation.
onstart:
    remote = workflow.remote_exec or workflow.subprocess_exec  # a job of the run, on its node
    if max(NODES.values()) > 1 and runs_jobs(sys.argv) and not remote and workflow.executor_plugin.name != "slurm":
        raise WorkflowError(
            "config: training.nodes or target.nodes is above 1, which needs the Slurm executor "
            f"(--profile profiles/slurm), not {workflow.executor_plugin.name}"
        )
