"""The workflow through a real Slurm: `snakemake --profile profiles/slurm` against the single-node
cluster of tests/slurm/cluster.sh (started here when it is not running, stopped again after).

Skipped only where Slurm is not installed and XMAS_REQUIRE_SLURM is unset; CI sets it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REDUCED_DEMO, REPO, TARGETS, job_counts, reduced_project, snakemake_command, workflow_environment

CLUSTER = REPO / "tests/slurm/cluster.sh"
SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol")
INSTALL = "apt-get install munge slurmctld slurmd slurm-client"
GPU_RULES = {"train_segment", "trajectory"}
# One Slurm job per rule instance of the reduced demo (3 checkpoints x 2 shards); main_subset, a copy,
# is a local rule.
REDUCED_PLAN = {
    "demo_data": 1,
    "prepare": 1,
    "proxy_init": 1,
    "train_segment": 3,
    "trajectory": 6,
    "merge": 1,
    "cluster": 1,
    "sample": 2,
}
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_cluster():
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        if os.environ.get("XMAS_REQUIRE_SLURM"):
            pytest.fail(f"XMAS_REQUIRE_SLURM is set but {', '.join(missing)} not found: {INSTALL}")
        pytest.skip(f"Slurm is not installed ({INSTALL})")
    was_running = subprocess.run([CLUSTER, "status"], capture_output=True).returncode == 0
    started = subprocess.run([CLUSTER, "start"], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr
    yield
    if not was_running:
        subprocess.run([CLUSTER, "stop"], capture_output=True, timeout=120)


def snakemake_on_slurm(project: Path, *args: str) -> list[str]:
    """The command line of `snakemake --profile profiles/slurm` in a project folder."""
    # short test jobs: first status check after 5 s instead of 40
    return snakemake_command(
        project, "--profile", str(REPO / "profiles/slurm"), "--slurm-init-seconds-before-status-checks", "5", *args
    )


def run_on_slurm(project: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # The timeout matters: when the plugin loses track of its jobs, Snakemake waits forever.
    return subprocess.run(
        snakemake_on_slurm(project, *args),
        cwd=project,
        env=workflow_environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_on_slurm(project: Path, target: str, log: Path) -> subprocess.Popen:
    """`snakemake --profile profiles/slurm <target>` started in the background, its output into ``log``."""
    with log.open("w") as out:
        return subprocess.Popen(
            snakemake_on_slurm(project, target),
            cwd=project,
            env=workflow_environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def succeeded(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def slurm_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay visible for the test cluster's MinJobAge)."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", shown))


def memory_mb(job: dict[str, str]) -> int:
    """A job's memory request (scontrol's MinMemoryNode: 1000M, 2G, ...) in MB."""
    number, unit = re.fullmatch(r"(\d+)([MG])", job["MinMemoryNode"]).groups()
    return int(number) * (1024 if unit == "G" else 1)


def slurm_logs(project: Path) -> dict[Path, list[str]]:
    """Slurm job ids by rule instance, from logs/slurm/rule_<rule>/[<wildcards>/]<job id>.log."""
    instances: dict[Path, list[str]] = {}
    for log in sorted((project / "logs/slurm").rglob("*.log"), key=lambda path: int(path.stem)):
        instances.setdefault(log.parent.relative_to(project / "logs/slurm"), []).append(log.stem)
    return instances


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory) -> tuple[Path, str]:
    """The reduced demo, both subsets, every job a Slurm job; one GPU per training and trajectory job
    (the test node advertises two)."""
    gpus = {section: {**REDUCED_DEMO[section], "gpus": 1} for section in ("training", "trajectory")}
    project = reduced_project(tmp_path_factory.mktemp("slurm"), **gpus)
    return project, succeeded(run_on_slurm(project, *TARGETS))


def test_every_rule_instance_ran_as_one_completed_slurm_job(slurm_run):
    project, output = slurm_run
    submitted = dict(SUBMITTED.findall(output))
    instances = slurm_logs(project)
    assert all(len(job_ids) == 1 for job_ids in instances.values()), instances
    per_rule = {}
    for instance in instances:
        rule = instance.parts[0].removeprefix("rule_")
        per_rule[rule] = per_rule.get(rule, 0) + 1
    assert per_rule == REDUCED_PLAN
    job_ids = [job_id for (job_id,) in instances.values()]
    assert sorted(submitted, key=int) == sorted(job_ids, key=int) and len(set(job_ids)) == sum(REDUCED_PLAN.values())
    for instance, (job_id,) in instances.items():
        rule = instance.parts[0].removeprefix("rule_")
        job = slurm_job(job_id)
        assert job["JobState"] == "COMPLETED" and job["Comment"].startswith(f"rule_{rule}"), (instance, job)
        assert (job.get("TresPerJob") == "gres:gpu:1") == (rule in GPU_RULES), (instance, job)
        assert Path(submitted[job_id]) == project / "logs/slurm" / instance / f"{job_id}.log"


def test_the_slurm_run_selects_the_same_subsets_as_a_local_run(slurm_run, workflow_run):
    project, _ = slurm_run
    for target in TARGETS:
        for output in (target, target.replace(".json", ".manifest.parquet")):
            assert (project / output).read_bytes() == (workflow_run / output).read_bytes(), output


def wait_for(condition, what: str, timeout: float = 300, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def slurm_state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], capture_output=True, text=True
    ).stdout.strip()


def test_a_cancelled_trajectory_job_is_retried_and_resumes_from_its_finished_rows(slurm_run, tmp_path):
    built, _ = slurm_run
    project = tmp_path / "project"
    shutil.copytree(built, project, symlinks=True)
    shutil.rmtree(project / "logs/slurm")
    # One shard per checkpoint, cut into many small part files: a job of several seconds.
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["trajectory"].update(shards=1, chunk_size=2, batch_size=1)
    (project / "config.yaml").write_text(yaml.safe_dump(config))
    target = "results/trajectories/checkpoint-1/shard-0.parquet"
    assert job_counts(succeeded(run_on_slurm(project, "-n", target))) == {"trajectory": 1, "total": 1}

    log = tmp_path / "snakemake.log"
    snakemake = start_on_slurm(project, target, log)
    try:
        parts = project / f"{target}.parts"
        tenth_part = parts / "part-00009.parquet"
        wait_for(lambda: tenth_part.exists() or snakemake.poll() is not None, "the shard's first ten part files")
        assert snakemake.poll() is None, log.read_text()[-6000:]
        [[first_job]] = slurm_logs(project).values()
        subprocess.run(["scancel", first_job], check=True)
        wait_for(lambda: slurm_state(first_job) == "CANCELLED", f"Slurm job {first_job} to end")
        rows_before_kill = sum(pq.read_metadata(part).num_rows for part in parts.glob("part-*.parquet"))
        snakemake.wait(timeout=600)
    finally:
        if snakemake.poll() is None:
            snakemake.kill()
    assert snakemake.returncode == 0, log.read_text()[-6000:]

    [[cancelled, retried]] = slurm_logs(project).values()
    assert cancelled == first_job
    assert slurm_job(cancelled)["JobState"] == "CANCELLED" and slurm_job(retried)["JobState"] == "COMPLETED"
    # the retry asks for twice the memory (config resources: memory grows with the attempt)
    assert memory_mb(slurm_job(retried)) == 2 * memory_mb(slurm_job(cancelled)) == 2 * 1000
    counts = json.loads((project / "logs/stats/trajectories/checkpoint-1/shard-0.json").read_text())["counts"]
    assert 0 < rows_before_kill < counts["in"]
    assert counts["resumed_rows"] == rows_before_kill
    assert counts["computed_rows"] == counts["in"] - rows_before_kill
    shard = pd.read_parquet(project / target)
    uninterrupted = pd.read_parquet(built / "results/trajectories.parquet").query("checkpoint == 1")
    pd.testing.assert_frame_equal(shard, uninterrupted.reset_index(drop=True), rtol=1e-5)


def test_a_cancelled_fine_tune_is_retried_and_resumes_from_its_last_saved_state(slurm_run, tmp_path):
    built, _ = slurm_run
    project = tmp_path / "project"
    shutil.copytree(built, project, symlinks=True)
    shutil.rmtree(project / "logs/slurm")
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["target"] = {**config.get("target", {}), "save_every_steps": 5}
    (project / "config.yaml").write_text(yaml.safe_dump(config))
    target = "results/target/full/1/seed-0"
    uninterrupted = tmp_path / "uninterrupted"
    shutil.copytree(project, uninterrupted, symlinks=True)
    subprocess.run(
        snakemake_command(uninterrupted, "--cores", "2", target),
        cwd=uninterrupted,
        env=workflow_environment(),
        check=True,
        capture_output=True,
        timeout=900,
    )

    log = tmp_path / "snakemake.log"
    snakemake = start_on_slurm(project, target, log)
    try:
        saved = project / f"{target}.partial/step-10/step.json"
        wait_for(lambda: saved.exists() or snakemake.poll() is not None, "the fine-tune's state after step 10")
        assert snakemake.poll() is None, log.read_text()[-6000:]
        [first_job] = slurm_logs(project)[Path("rule_finetune_target/full_1_0")]
        subprocess.run(["scancel", first_job], check=True)
        wait_for(lambda: slurm_state(first_job) == "CANCELLED", f"Slurm job {first_job} to end")
        snakemake.wait(timeout=900)
    finally:
        if snakemake.poll() is None:
            snakemake.kill()
    assert snakemake.returncode == 0, log.read_text()[-6000:]

    cancelled, retried = slurm_logs(project)[Path("rule_finetune_target/full_1_0")]
    assert cancelled == first_job and slurm_job(retried)["JobState"] == "COMPLETED"
    stats = json.loads((project / "logs/stats/target/full/1/seed-0.json").read_text())
    step = stats["counts"]["resumed_at_step"]
    assert step >= 10 and f"resuming from step {step} of" in (project / "logs/target/full/1/seed-0.log").read_text()
    for name in ("model.safetensors", "xmas_finetune.json"):
        finished = (project / target / name).read_bytes()
        assert finished == (uninterrupted / target / name).read_bytes().replace(
            str(uninterrupted).encode(), str(project).encode()
        ), name
    assert not (project / f"{target}.partial").exists()


def test_a_refused_partition_is_explained(slurm_cluster, tmp_path):
    project = reduced_project(tmp_path)
    result = subprocess.run(
        snakemake_on_slurm(project, "--retries", "0", "results/demo/train.json"),
        cwd=project,
        env=workflow_environment(SBATCH_PARTITION="no-such-partition"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "invalid partition specified: no-such-partition" in result.stderr
    assert "Slurm refused the jobs' account or partition" in result.stderr
    assert "export SBATCH_ACCOUNT=<account> SBATCH_PARTITION=<partition>" in result.stderr


def test_the_plan_warns_of_jobs_no_node_could_run(slurm_cluster, tmp_path):
    """A 3-CPU trajectory job on this cluster's 2-CPU node would stay pending for ever; `plan` says so."""
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], capture_output=True, text=True, check=True)
    cpus, memory = (int(value) for value in nodes.stdout.split())
    fits = reduced_project(tmp_path / "fits")
    assert "warning" not in run_on_slurm(fits, "plan", timeout=120).stderr
    too_big = reduced_project(
        tmp_path / "too-big",
        trajectory={**REDUCED_DEMO["trajectory"], "threads": cpus + 1},
        training={**REDUCED_DEMO["training"], "nodes": 2},
        resources={"merge": {"mem_mb": memory + 1}},
    )
    result = run_on_slurm(too_big, "plan", timeout=120)
    succeeded(result)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        "warning: rule train_segment: its jobs ask for 2 nodes, but partition main has 1: Slurm would leave them "
        "pending for ever",
        f"warning: rule trajectory: its jobs ask for {cpus + 1} CPUs, but no node of partition main has more than "
        f"{cpus}: Slurm would leave them pending for ever",
        f"warning: rule merge: its jobs ask for {memory + 1} MB of memory, but no node of partition main has more "
        f"than {memory}: Slurm would leave them pending for ever",
    ]
    assert not (too_big / "logs").exists() and not (too_big / "results").exists()
