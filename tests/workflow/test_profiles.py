"""The paper's configs and the execution profiles, through `snakemake -n`: the plan without the data."""

from __future__ import annotations

import re

import pytest
import yaml
from snakemake.utils import validate

from xmas.settings import SCHEMA, all_settings, defaults

from conftest import REPO, job_counts, snakemake

PAPER_CONFIGS = {"llava665k": "results/subset_0.5.json", "visionflan": "results/subset_0.1.json"}
GPU_RULES = {"train_segment", "trajectory"}


def load(path):
    return yaml.safe_load((REPO / path).read_text())


def test_llava665k_plan_is_printed_without_the_data(tmp_path):
    project = tmp_path
    # The target goes first: --configfile takes every argument after it as a config file.
    result = snakemake(project, "-n", "results/subset_0.5.json", "--configfile", str(REPO / "config/llava665k.yaml"))
    assert job_counts(result.stdout) == {"download": 1, "prepare": 1, "proxy_init": 1, "train_segment": 5,
                                         "trajectory": 40, "merge": 1, "cluster": 1, "sample": 1, "main_subset": 1,
                                         "total": 52}
    assert not (project / "data").exists()


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_plans_one_job_per_checkpoint_and_shard(name, tmp_path):
    config = load(f"config/{name}.yaml")
    checkpoints, shards = defaults("train-segment")["checkpoints"], config["trajectory"]["shards"]
    counts = job_counts(snakemake(tmp_path, "-n", PAPER_CONFIGS[name],
                                  "--configfile", str(REPO / f"config/{name}.yaml")).stdout)
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
    assert (paper["proxy"]["image_preprocessing"], paper["target"]["image_preprocessing"]) == ("crop", "pad")
    assert paper["selection"]["clusters"] == 1000
    validate(paper, str(SCHEMA))


def planned_resources(dry_run_output: str) -> dict[str, dict[str, str]]:
    """The resources `snakemake -n` prints for one job of each rule."""
    jobs = re.findall(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$", dry_run_output, re.MULTILINE)
    return {rule: dict(item.split("=", 1) for item in resources.split(", ")) for rule, resources in jobs}


def test_slurm_profile_takes_account_and_partitions_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SBATCH_ACCOUNT", "lab42")
    monkeypatch.setenv("SBATCH_PARTITION", "cpu")
    monkeypatch.setenv("XMAS_GPU_PARTITION", "a100")
    result = snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles/slurm"),
                       "results/subset_0.5.json", "--configfile", str(REPO / "config/llava665k.yaml"))
    resources = planned_resources(result.stdout)
    assert set(resources) >= GPU_RULES | {"prepare", "cluster", "sample"}
    for rule, job in resources.items():
        assert job["slurm_account"] == "lab42", rule
        assert job["slurm_partition"] == ("a100" if rule in GPU_RULES else "cpu"), rule
        assert job.get("gpu", "0") == ("1" if rule in GPU_RULES else "0"), rule
        assert int(job["runtime"]) >= 120 and int(job["mem_mb"]) >= 8000, rule


def test_slurm_profile_without_account_or_partition_leaves_them_to_the_cluster(tmp_path, monkeypatch):
    for variable in ("SBATCH_ACCOUNT", "SBATCH_PARTITION", "XMAS_GPU_PARTITION"):
        monkeypatch.delenv(variable, raising=False)
    result = snakemake(tmp_path, "-n", "--profile", str(REPO / "profiles/slurm"),
                       "results/subset_0.5.json")
    for rule, job in planned_resources(result.stdout).items():
        assert "slurm_account" not in job and "slurm_partition" not in job, rule
        assert job.get("gpu", "0") == "0", rule  # the demo config asks for no GPUs


def test_local_profile_plans_the_demo(tmp_path):
    result = snakemake(tmp_path, "--profile", str(REPO / "profiles/local"), "-n",
                       "results/subset_0.5.json")
    assert job_counts(result.stdout)["trajectory"] == 10


def test_llava665k_evaluation_plan_runs_the_paper_recipe_on_8_gpus(tmp_path):
    project = tmp_path
    result = snakemake(project, "-n", "-p", "results/eval/summary.tsv", "--configfile",
                       str(REPO / "config/llava665k.yaml"))
    counts = job_counts(result.stdout)
    # 3 methods x 4 budgets x 1 seed, plus the full set
    assert counts["finetune_target"] == counts["evaluate"] == 13
    commands = [line.removeprefix("Shell command: ") for line in result.stdout.splitlines()]
    finetune = next(line for line in commands if " finetune-target --base" in line)
    assert finetune.startswith("torchrun --standalone --nproc_per_node 8 -m xmas finetune-target")
    for flag in ("--lora-r 128", "--lora-alpha 256", "--learning-rate 0.0002", "--projector-learning-rate 2e-05",
                 "--batch-size 128", "--micro-batch-size 16", "--epochs 1", "--precision bf16", "--deepspeed zero3",
                 "--freeze-vision-tower", "--gradient-checkpointing"):
        assert flag in finetune
    evaluate = next(line for line in commands if line.startswith("xmas evaluate"))
    assert "--suite lmms-eval" in evaluate and "--benchmarks vqav2,gqa" in evaluate
    assert "llava_wild" not in evaluate and "--allow-judge" not in evaluate
