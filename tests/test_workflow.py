"""The whole workflow through Snakemake on a reduced demo: DAG shape, subset size, accounting, determinism."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, small_generator_settings
from xmas.io import read_records

TARGETS = ["results/subset_0.5.json", "results/random/subset_0.5.json"]


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow/Snakefile"),
               "--directory", str(workdir), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def reduced_project(root: Path) -> Path:
    """A project folder whose config/config.yaml is the demo, scaled down to run in about a minute."""
    (root / "config").mkdir(parents=True)
    (root / "generator.yaml").write_text(yaml.safe_dump(small_generator_settings(records=300)))
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["dataset"]["demo"] = str(root / "generator.yaml")
    config["training"].update(checkpoints=3, epochs=1, threads=1)
    config["trajectory"].update(shards=2, chunk_size=64)
    (root / "config/config.yaml").write_text(yaml.safe_dump(config))
    return root


def job_counts(dry_run_output: str) -> dict[str, int]:
    table = dry_run_output.split("Job stats:")[1]
    return {name: int(n) for name, n in re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def test_dry_run_of_the_shipped_demo_lists_one_job_per_checkpoint_and_shard(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config/config.yaml").write_text((REPO / "config/config.yaml").read_text()
                                                 .replace("resources/", f"{REPO}/resources/"))
    counts = job_counts(snakemake(tmp_path, "-n", "results/subset_0.5.json").stdout)
    assert counts["train_segment"] == 5 and counts["trajectory"] == 10
    assert counts["demo_data"] == counts["prepare"] == counts["proxy_init"] == counts["merge"] == 1


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    project = reduced_project(tmp_path_factory.mktemp("run1"))
    counts = job_counts(snakemake(project, "-n", *TARGETS).stdout)
    assert counts["train_segment"] == 3 and counts["trajectory"] == 6
    snakemake(project, "--cores", "2", *TARGETS)
    return project


@pytest.mark.slow
def test_subset_has_the_exact_budget_and_unchanged_records(first_run):
    examples = pd.read_parquet(first_run / "results/data/examples.parquet")
    n_valid = int((examples.status == "ok").sum())
    source = read_records(first_run / "results/demo/train.json")
    for target in TARGETS:
        subset = json.loads((first_run / target).read_text())
        manifest = pd.read_parquet(first_run / target.replace(".json", ".manifest.parquet"))
        assert len(subset) == round(0.5 * n_valid) == manifest.selected.sum()
        assert manifest.uid.tolist() == examples.uid.tolist()  # every source record, once, in source order
        assert subset == [source[i] for i in manifest.loc[manifest.selected, "index"]]
    trajectories = pd.read_parquet(first_run / "results/trajectories.parquet")
    assert len(trajectories) == 3 * int(examples.has_image.sum())
    clusters = pd.read_parquet(first_run / "results/selection/clusters.parquet")
    assert list(clusters.columns) == ["uid", "cluster", "stability"] and len(clusters) == n_valid


@pytest.mark.slow
def test_every_stage_reports_its_counts(first_run):
    stats = sorted(p.relative_to(first_run / "logs/stats").as_posix() for p in (first_run / "logs/stats").rglob("*.json"))
    assert len(stats) == 1 + 1 + 1 + 3 + 6 + 1 + 1 + 2
    prepare = json.loads((first_run / "logs/stats/prepare.json").read_text())
    assert prepare["counts"]["in"] == 300 and prepare["counts"]["out"] == 300
    sample = json.loads((first_run / "logs/stats/sample/xmas_0.5.json").read_text())
    assert sample["counts"]["selected"] + sample["counts"]["not_selected"] + sample["excluded_total"] == 300


@pytest.mark.slow
def test_a_second_run_from_scratch_is_byte_identical(first_run, tmp_path):
    project = reduced_project(tmp_path / "run2")
    snakemake(project, "--cores", "2", *TARGETS)
    for target in [*TARGETS, "results/subset_0.5.manifest.parquet", "results/trajectories.parquet"]:
        assert (project / target).read_bytes() == (first_run / target).read_bytes(), target
