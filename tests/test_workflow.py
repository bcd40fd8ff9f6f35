"""The whole workflow through Snakemake on a reduced demo: DAG shape, subset size, accounting, determinism."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import REPO, TARGETS, job_counts, reduced_project, snakemake
from xmas.annotations import read_all


def test_dry_run_of_the_reduced_demo(tmp_path):
    counts = job_counts(snakemake(reduced_project(tmp_path), "-n", *TARGETS).stdout)
    assert counts["train_segment"] == 3 and counts["trajectory"] == 6


def test_dry_run_of_the_shipped_demo_lists_one_job_per_checkpoint_and_shard(tmp_path):
    (tmp_path / "config").mkdir()
    (tmp_path / "config/config.yaml").write_text((REPO / "config/config.yaml").read_text()
                                                 .replace("resources/", f"{REPO}/resources/"))
    counts = job_counts(snakemake(tmp_path, "-n", "results/subset_0.5.json").stdout)
    assert counts["train_segment"] == 5 and counts["trajectory"] == 10
    assert counts["demo_data"] == counts["prepare"] == counts["proxy_init"] == counts["merge"] == 1


@pytest.mark.slow
def test_subset_has_the_exact_budget_and_unchanged_records(workflow_run):
    examples = pd.read_parquet(workflow_run / "results/data/examples.parquet")
    n_valid = int((examples.status == "ok").sum())
    source = read_all(workflow_run / "results/demo/train.json")
    for target in TARGETS:
        subset = json.loads((workflow_run / target).read_text())
        manifest = pd.read_parquet(workflow_run / target.replace(".json", ".manifest.parquet"))
        assert len(subset) == round(0.5 * n_valid) == manifest.selected.sum()
        assert manifest.uid.tolist() == examples.uid.tolist()  # every source record, once, in source order
        assert subset == [source[i] for i in manifest.loc[manifest.selected, "index"]]
    trajectories = pd.read_parquet(workflow_run / "results/trajectories.parquet")
    assert len(trajectories) == 3 * int(examples.has_image.sum())
    clusters = pd.read_parquet(workflow_run / "results/selection/clusters.parquet")
    assert list(clusters.columns) == ["uid", "cluster", "stability"] and len(clusters) == n_valid


@pytest.mark.slow
def test_every_stage_reports_its_counts(workflow_run):
    stats = {p.relative_to(workflow_run / "logs/stats").as_posix() for p in (workflow_run / "logs/stats").rglob("*.json")}
    jobs = {"demo_data.json", "prepare.json", "merge.json", "cluster.json", "sample/xmas_0.5.json",
            "sample/random_0.5.json", *(f"proxy/checkpoint-{c}.json" for c in range(4)),
            *(f"trajectories/checkpoint-{c}/shard-{s}.json" for c in (1, 2, 3) for s in (0, 1))}
    assert jobs <= stats
    prepare = json.loads((workflow_run / "logs/stats/prepare.json").read_text())
    assert prepare["counts"]["in"] == 300 and prepare["counts"]["out"] == 300
    sample = json.loads((workflow_run / "logs/stats/sample/xmas_0.5.json").read_text())
    assert sample["counts"]["selected"] + sample["counts"]["not_selected"] + sample["excluded_total"] == 300


@pytest.mark.slow
def test_a_second_run_from_scratch_is_byte_identical(workflow_run, tmp_path):
    project = reduced_project(tmp_path / "run2")
    snakemake(project, "--cores", "2", *TARGETS)
    for target in [*TARGETS, "results/subset_0.5.manifest.parquet", "results/trajectories.parquet"]:
        assert (project / target).read_bytes() == (workflow_run / target).read_bytes(), target
