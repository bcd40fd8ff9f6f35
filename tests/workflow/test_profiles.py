"""The paper's configs and the execution profiles, through `snakemake -n`: the plan without the data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from xmas.settings import SCHEMA, all_settings, defaults

from conftest import REPO, job_counts, reduced_project, snakemake

PAPER_CONFIGS = {"llava665k": "results/subset_0.5.json", "visionflan": "results/subset_0.1.json"}


def load(path):
    return yaml.safe_load((REPO / path).read_text())


def test_llava665k_plan_is_printed_without_the_data(tmp_path):
    project = tmp_path
    # The target goes first: --configfile takes every argument after it as a config file.
    result = snakemake(project, "-n", "results/subset_0.5.json", "--configfile", str(REPO / "config/llava665k.yaml"))
    assert job_counts(result.stdout) == {
        "download": 1,
        "prepare": 1,
        "proxy_init": 1,
        "train_segment": 5,
        "trajectory": 40,
        "merge": 1,
        "cluster": 1,
        "sample": 1,
        "main_subset": 1,
        "total": 52,
    }
    assert not (project / "data").exists()


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_plans_one_job_per_checkpoint_and_shard(name, tmp_path):
    config = load(f"config/{name}.yaml")
    checkpoints, shards = defaults("train-segment")["checkpoints"], config["trajectory"]["shards"]
    counts = job_counts(
        snakemake(tmp_path, "-n", PAPER_CONFIGS[name], "--configfile", str(REPO / f"config/{name}.yaml")).stdout
    )
    assert counts["train_segment"] == checkpoints and counts["trajectory"] == checkpoints * shards
    assert counts["download"] == counts["prepare"] == counts["merge"] == counts["cluster"] == 1


def commented_keys(text: str) -> set[str]:
    """``section.key`` of every setting with a comment on its line or on the lines just above it."""
    keys, section, comment_above = set(), None, False
    for line in text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith(":"):
            section = line.rstrip()[:-1]
        elif line.startswith("  ") and not line.strip().startswith("#") and ":" in line:
            if "#" in line or comment_above:
                keys.add(f"{section}.{line.split(':')[0].strip()}")
        comment_above = line.strip().startswith("#")
    return keys


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_configs_set_only_what_differs_from_the_defaults_each_with_its_source(name):
    """Defaults come from the schema alone; a paper config states the paper's changes and where each comes from."""
    text = (REPO / f"config/{name}.yaml").read_text()
    paper = yaml.safe_load(text)
    defaults_of = {setting.name: setting.default for setting in all_settings()}
    sourced = commented_keys(text)
    for section, values in paper.items():
        for key, value in values.items():
            assert value != defaults_of[f"{section}.{key}"], f"{section}.{key} repeats its default"
            assert f"{section}.{key}" in sourced, f"{section}.{key} has no source comment"
    assert paper["dataset"]["download"] == name and paper["proxy"]["model"] == "tinyllava-stablelm2-clip336"
    assert (paper["proxy"]["conversation"], paper["target"]["conversation"]) == ("phi", "vicuna_v1")
    assert (paper["proxy"]["image_preprocessing"], paper["target"]["image_preprocessing"]) == ("native", "pad")
    assert paper["selection"]["clusters"] == 1000
    validate(paper, str(SCHEMA))


# Rules that run on the submit host (localrule), which `snakemake -n` prints like the others.
LOCAL_RULES = {"download", "main_subset", "plan"}


def planned_jobs(dry_run_output: str) -> dict[str, dict[str, str]]:
    """What `snakemake -n` prints each rule's Slurm jobs will ask for, checking that every job of a rule
    asks for the same."""
    blocks = re.findall(
        r"^(?:rule|checkpoint) (\w+):\n(?:    .*\n)*?    resources: (.*)$", dry_run_output, re.MULTILINE
    )
    plan: dict[str, dict[str, str]] = {}
    for rule, resources in blocks:
        if rule in LOCAL_RULES:
            continue
        asked = dict(item.split("=", 1) for item in resources.split(", "))
        asked = {
            key: asked[key]
            for key in ("mem_mb", "runtime", "nodes", "gpu", "slurm_account", "slurm_partition")
            if key in asked
        }
        assert plan.setdefault(rule, asked) == asked, f"jobs of rule {rule} ask for different resources"
    return plan


def job(mem_mb, runtime, gpu=None, account=None, partition=None):
    asked = {"mem_mb": str(mem_mb), "runtime": str(runtime), "nodes": "1"}
    for key, value in (("gpu", gpu), ("slurm_account", account), ("slurm_partition", partition)):
        if value is not None:
            asked[key] = str(value)
    return asked


EVERY_TARGET = ("results/eval/summary.tsv", "results/report.html", "results/eval/report.html")


def test_the_llava665k_plan_asks_each_rule_for_what_llava665k_needs_on_the_right_partition(tmp_path, monkeypatch):
    monkeypatch.setenv("SBATCH_ACCOUNT", "lab42")
    monkeypatch.setenv("SBATCH_PARTITION", "cpu")
    monkeypatch.setenv("XMAS_GPU_PARTITION", "a100")
    result = snakemake(
        tmp_path,
        "-n",
        "--profile",
        str(REPO / "profiles/slurm"),
        *EVERY_TARGET,
        "--configfile",
        str(REPO / "config/llava665k.yaml"),
    )
    cpu = {"account": "lab42", "partition": "cpu"}
    gpu = {"account": "lab42", "partition": "a100"}
    assert planned_jobs(result.stdout) == {
        "prepare": job(16000, 240, **cpu),
        "proxy_init": job(24000, 60, **cpu),
        "train_segment": job(64000, 1440, gpu=1, **gpu),
        "trajectory": job(32000, 480, gpu=1, **gpu),
        "merge": job(16000, 60, **cpu),
        "cluster": job(32000, 120, **cpu),
        "features": job(32000, 480, gpu=1, **gpu),
        "cluster_features": job(128000, 2880, **cpu),
        "sample": job(16000, 60, **cpu),
        "report": job(1000, 30, **cpu),
        "target_init": job(64000, 120, **cpu),
        # one node of 8 GPUs: accelerate launch starts its 8 processes there
        "finetune_target": job(192000, 1440, gpu=8, **gpu),
        "evaluate": job(64000, 720, gpu=1, **gpu),
        "summarize": job(1000, 30, **cpu),
        "evaluation_report": job(1000, 30, **cpu),
    }


def machine_memory_mb() -> int:
    kib = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())[1])
    return kib // 1024


def test_the_demo_plan_asks_for_little_and_fits_this_machine(tmp_path, monkeypatch):
    for variable in ("SBATCH_ACCOUNT", "SBATCH_PARTITION", "XMAS_GPU_PARTITION"):
        monkeypatch.delenv(variable, raising=False)
    result = snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles/slurm"), *EVERY_TARGET)
    plan = planned_jobs(result.stdout)
    assert plan == {
        "demo_data": job(1000, 30),
        "prepare": job(1000, 30),
        "proxy_init": job(1000, 30),
        "train_segment": job(2000, 60, gpu=0),
        "trajectory": job(1000, 60, gpu=0),
        "merge": job(1000, 30),
        "cluster": job(1000, 30),
        "features": job(1000, 60, gpu=0),
        "cluster_features": job(1000, 30),
        "coherence": job(2000, 30, gpu=0),
        "sample": job(1000, 30),
        "report": job(1000, 30),
        "target_init": job(1000, 30),
        "pretrain_target": job(2000, 60, gpu=0),
        "finetune_target": job(2000, 60, gpu=0),
        "evaluate": job(1000, 60, gpu=0),
        "summarize": job(1000, 30),
        "evaluation_report": job(1000, 30),
    }
    assert max(int(asked["mem_mb"]) for asked in plan.values()) < machine_memory_mb()


def test_a_rules_resources_can_be_set_in_part(tmp_path):
    project = reduced_project(tmp_path, resources={"prepare": {"mem_mb": 1500}})
    plan = planned_jobs(snakemake(project, "-n", "results/data/examples.parquet").stdout)
    assert plan["prepare"]["mem_mb"] == "1500" and plan["prepare"]["runtime"] == "30"


def plan_table(project, *config) -> list[str]:
    output = snakemake(project, "--cores", "1", "plan", *config).stdout
    return [line for line in output.splitlines() if line.startswith("| ")]


def test_snakemake_plan_prints_every_rules_cpus_gpus_memory_and_runtime(tmp_path):
    table = plan_table(tmp_path, "--configfile", str(REPO / "config/llava665k.yaml"))
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table[2:]}
    assert table[0] == "| rule | CPUs | GPUs | nodes | processes | memory (MB) | runtime (min) |"
    assert rows["finetune_target"] == "| finetune_target | 8 | 8 | 1 | 8 | 192000 | 1440 |"
    assert rows["trajectory"] == "| trajectory | 4 | 1 | 1 | 1 | 32000 | 480 |"
    assert rows["prepare"] == "| prepare | 2 | 0 | 1 | 1 | 16000 | 240 |"
    assert "demo_data" not in rows and "standin_model" not in rows  # not in this config's jobs
    assert not [path for path in tmp_path.rglob("*") if ".snakemake" not in path.parts]  # it writes no file
    # The README shows the table as the workflow prints it.
    assert "\n".join(table) in (REPO / "README.md").read_text()


def test_local_profile_plans_the_demo(tmp_path):
    result = snakemake(tmp_path, "--profile", str(REPO / "profiles/local"), "-n", "results/subset_0.5.json")
    assert job_counts(result.stdout)["trajectory"] == 10


def test_llava665k_evaluation_plan_runs_the_paper_recipe_on_8_gpus(tmp_path):
    project = tmp_path
    result = snakemake(
        project, "-n", "-p", "results/eval/summary.tsv", "--configfile", str(REPO / "config/llava665k.yaml")
    )
    counts = job_counts(result.stdout)
    # 3 methods x 4 budgets x 1 seed, plus the full set
    assert counts["finetune_target"] == counts["evaluate"] == 13
    commands = [line.removeprefix("Shell command: ") for line in result.stdout.splitlines()]
    finetune = next(line for line in commands if " finetune-target --base" in line)
    assert finetune.startswith("accelerate launch --multi_gpu --num_machines 1 --num_processes 8 ")
    assert " --mixed_precision bf16 --dynamo_backend no -m xmas finetune-target" in finetune
    for flag in (
        "--lora-r 128",
        "--lora-alpha 256",
        "--learning-rate 0.0002",
        "--projector-learning-rate 2e-05",
        "--batch-size 128",
        "--micro-batch-size 16",
        "--epochs 1",
        "--precision bf16",
        "--deepspeed zero3",
        "--freeze-vision-tower",
        "--gradient-checkpointing",
    ):
        assert flag in finetune
    evaluate = next(line for line in commands if line.startswith("xmas evaluate"))
    assert "--suite lmms-eval" in evaluate and "--benchmarks vqav2,gqa" in evaluate
    assert "llava_wild" not in evaluate and "--allow-judge" not in evaluate


def imported_modules(importtime_log: str) -> set[str]:
    """Every module `python -X importtime` reports, by its full name."""
    return {line.rsplit("|", 1)[1].strip() for line in importtime_log.splitlines() if line.startswith("import time:")}


def test_planning_the_paper_run_imports_neither_torch_nor_transformers(tmp_path):
    """The DAG is built on a login node: neither may be needed there, nor cost their import time."""
    command = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "workflow/Snakefile"),
        "--directory",
        str(tmp_path),
        "-n",
        *EVERY_TARGET,
        "--configfile",
        str(REPO / "config/llava665k.yaml"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = imported_modules(result.stderr)
    assert {"snakemake", "xmas.settings", "yaml"} <= modules  # the log is what it claims to be
    assert not {name for name in modules if name.split(".")[0] in ("torch", "transformers")}
