# What a job asks a cluster for: CPUs, GPUs and nodes from the settings, memory and wall time from the config's
# resources section (xmas.settings.job_resources).

# CPUs (Slurm --cpus-per-task) and GPUs of the rules that use more than one CPU or can use a GPU.
THREADS = {
    "prepare": 2,
    "train_segment": TRAINING["threads"],
    "trajectory": TRAJECTORY["threads"],
    "features": FEATURES["threads"],
    "cluster_features": FEATURES["cluster_threads"],
    "pretrain_target": ALIGNMENT["threads"],
    "finetune_target": TARGET["threads"],
    "evaluate": EVALUATION["threads"],
    "coherence": COHERENCE["threads"],
}
GPUS = {
    "train_segment": TRAINING["gpus"],
    "trajectory": TRAJECTORY["gpus"],
    "features": FEATURES["gpus"],
    "pretrain_target": TARGET["gpus"],
    "finetune_target": TARGET["gpus"],
    "evaluate": EVALUATION["gpus"],
    "coherence": COHERENCE["gpus"],
}
# The training rules may span nodes: `gpus` GPUs on each, one accelerate launch per node (xmas.training.launch).
NODES = {
    "train_segment": TRAINING["nodes"],
    "pretrain_target": TARGET["nodes"],
    "finetune_target": TARGET["nodes"],
}


def job(rule_name):
    """The resources a job of ``rule_name`` asks a cluster for (:func:`asks`), its memory growing with the
    retry attempt."""
    asked = asks(rule_name)
    resources = {
        "mem_mb": lambda wildcards, attempt: asked["mem_mb"] * attempt,
        "runtime": asked["runtime"],
        "nodes": asked["nodes"],
    }
    if asked["nodes"] > 1:
        # The Slurm executor asks for `gpu` in all (--gpus), `gres` per node; an `mpi` job runs its command on
        # the first node as it is, and the command's srun starts a task (a launcher) on every node.
        resources.update(gres=f"gpu:{asked['GPUs']}", mpi="srun", tasks=asked["nodes"])
    elif rule_name in GPUS:
        resources["gpu"] = asked["GPUs"]
    if asked["partition"]:
        resources["slurm_partition"] = asked["partition"]
    # which job it is, for `snakemake plan` (executors pass on only the resources they know)
    resources["xmas_job"] = rule_name
    return resources


def asks(rule_name):
    """What a job of ``rule_name`` asks for on its first attempt. Memory and wall time come from the config's
    resources, per node; the CPUs and GPUs of its settings, per node; its nodes (one but for the training rules
    of a config that asks for more). Jobs that use a GPU go to the partition XMAS_GPU_PARTITION names, when set
    (profiles/slurm)."""
    gpu_partition = GPUS.get(rule_name) and os.environ.get("XMAS_GPU_PARTITION")
    return {
        "CPUs": THREADS.get(rule_name, 1),
        "GPUs": GPUS.get(rule_name, 0),
        "nodes": NODES.get(rule_name, 1),
        **job_resources(config, rule_name),
        "partition": os.environ["XMAS_GPU_PARTITION"] if gpu_partition else None,
    }


def planned_jobs():
    """{rule: what its jobs ask for on their first attempt}, for every rule of this config that runs as a
    job; a rule derived from another with `use rule` asks for what that one does."""
    return {
        defined.name: asks(defined.resources["xmas_job"].value)
        for defined in workflow.rules
        if "xmas_job" in defined.resources
    }


def plan_table():
    """`snakemake plan`: what each rule's jobs ask for under this config, as a Markdown table."""
    rows = [
        "| rule | CPUs | GPUs | nodes | processes | memory (MB) | runtime (min) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, asked in planned_jobs().items():
        rows.append(
            f"| {name} | {asked['CPUs']} | {asked['GPUs']} | {asked['nodes']} | {processes(name, asked)} | "
            f"{asked['mem_mb']} | {asked['runtime']} |"
        )
    return "\n".join(rows)


def processes(rule_name, asked):
    """A job's processes: one per GPU on every node for the rules accelerate launches, else one."""
    launched = rule_name in NODES or rule_name == "evaluate"
    return max(1, asked["GPUs"]) * asked["nodes"] if launched else 1


def slurm_nodes():
    """{partition: [(CPUs, memory MB, GPUs) of each node]} as sinfo reports them, and the default partition."""
    listed = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"], capture_output=True, text=True, check=True)
    nodes, default = {}, None
    for line in listed.stdout.splitlines():
        partition, cpus, memory, gres = line.strip().split("|")
        if partition.endswith("*"):
            partition = default = partition[:-1]
        gpus = sum(int(count) for count in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
        nodes.setdefault(partition, []).append((int(cpus), int(re.sub(r"\D", "", memory) or 0), gpus))
    return nodes, default


def unplaceable_jobs(plan, nodes, default):
    """One line per rule whose jobs ask for more CPUs, memory or GPUs than any node of their partition offers
    (Slurm would leave them pending for ever)."""
    lines = []
    for name, asked in plan.items():
        partition = asked["partition"] or os.environ.get("SBATCH_PARTITION") or default
        offered = nodes.get(partition, [])
        if not offered:
            lines.append(f"{name}: its partition {partition!r} is not one of sinfo's ({', '.join(nodes)})")
            continue
        if asked["nodes"] > len(offered):
            lines.append(
                f"{name}: its jobs ask for {asked['nodes']} nodes, but partition {partition} has "
                f"{len(offered)}: Slurm would leave them pending for ever"
            )
        for what, unit, position in (("CPUs", "CPUs", 0), ("mem_mb", "MB of memory", 1), ("GPUs", "GPUs", 2)):
            most = max(node[position] for node in offered)
            if asked[what] > most:
                lines.append(
                    f"{name}: its jobs ask for {asked[what]} {unit}, but no node of partition {partition} "
                    f"has more than {most}: Slurm would leave them pending for ever"
                )
    return lines


def print_plan():
    """`snakemake plan`: the table on stdout; with the Slurm executor, the jobs no node could run on stderr."""
    print(plan_table())
    if workflow.executor_plugin.name == "slurm":
        for line in unplaceable_jobs(planned_jobs(), *slurm_nodes()):
            print(f"warning: rule {line}", file=sys.stderr)


def launcher(section):
    """`xmas` on up to one GPU, `accelerate launch` with one process per GPU beyond, through srun on every node of
    a job of several (``section``: the training or target config section: its gpus, precision and nodes)."""
    return " ".join(launcher_prefix(section["gpus"], section["precision"], section["nodes"]))
