"""The whole workflow through Snakemake on a reduced demo: DAG shape, subset size, accounting, determinism."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from xmas.data.annotations import read_all

from conftest import REDUCED_DEMO, SUBSET_DIGESTS, TARGETS, job_counts, reduced_project, run_snakemake, snakemake


def test_dry_run_of_the_reduced_demo(tmp_path):
    counts = job_counts(snakemake(reduced_project(tmp_path), "-n", *TARGETS).stdout)
    assert counts["train_segment"] == 3 and counts["trajectory"] == 6


def test_the_demo_runs_from_any_folder_without_a_config(tmp_path):
    """The demo is the settings' defaults: an empty folder plans it."""
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
def test_the_reduced_demo_selects_the_recorded_subsets(workflow_run):
    for target, digest in SUBSET_DIGESTS.items():
        assert hashlib.sha256((workflow_run / target).read_bytes()).hexdigest() == digest, target


@pytest.mark.slow
def test_every_stage_reports_its_counts(workflow_run):
    root = workflow_run / "logs/stats"
    stats = {path.relative_to(root).as_posix() for path in root.rglob("*.json")}
    jobs = {
        "demo_data.json",
        "prepare.json",
        "merge.json",
        "cluster.json",
        "sample/xmas/seed-0/0.5.json",
        "sample/random/seed-0/0.5.json",
        *(f"proxy/checkpoint-{c}.json" for c in range(4)),
        *(f"trajectories/checkpoint-{c}/shard-{s}.json" for c in (1, 2, 3) for s in (0, 1)),
    }
    assert jobs <= stats
    prepare = json.loads((workflow_run / "logs/stats/prepare.json").read_text())
    assert prepare["counts"]["in"] == 300 and prepare["counts"]["out"] == 300
    sample = json.loads((workflow_run / "logs/stats/sample/xmas/seed-0/0.5.json").read_text())
    assert sample["counts"]["selected"] + sample["counts"]["not_selected"] + sample["excluded_total"] == 300


@pytest.mark.slow
def test_a_second_run_from_scratch_is_byte_identical(workflow_run, tmp_path):
    project = reduced_project(tmp_path / "run2")
    snakemake(project, "--cores", "2", *TARGETS)
    for target in [*TARGETS, "results/subset_0.5.manifest.parquet", "results/trajectories.parquet"]:
        assert (project / target).read_bytes() == (workflow_run / target).read_bytes(), target


def test_dry_run_of_the_demo_evaluation_trains_every_method_budget_and_seed(tmp_path):
    result = snakemake(tmp_path, "-n", "results/eval/summary.tsv")
    counts = job_counts(result.stdout)
    # 6 methods x 3 budgets x 3 seeds, plus the full set per seed
    assert counts["finetune_target"] == counts["evaluate"] == 6 * 3 * 3 + 3
    assert counts["target_init"] == counts["pretrain_target"] == counts["summarize"] == 1
    # one sample rule for every method: xmas, xmas-proportional, coincide and semdedup one subset per
    # budget; random and cluster-random one per budget and seed; full one
    assert counts["sample"] == 4 * 3 + 2 * 3 * 3 + 1
    assert counts["features"] == 2 and counts["cluster_features"] == 2  # coherence: the report's alone
    seeds = (("xmas", 0), ("xmas-proportional", 0), ("random", 2), ("cluster-random", 1), ("coincide", 0), ("full", 0))
    for method, seed in seeds:
        assert f"results/{method}/seed-{seed}/subset_" in result.stdout


def test_the_paper_configs_do_not_align_and_the_demo_alignment_needs_the_shape_scenes(tmp_path):
    counts = job_counts(
        snakemake(reduced_project(tmp_path, alignment={"captions": None}), "-n", "results/eval/summary.tsv").stdout
    )
    assert "pretrain_target" not in counts and counts["target_init"] == 1
    project = reduced_project(tmp_path / "own", dataset={"annotations": "own.json", "image_root": "images"})
    (project / "own.json").write_text("[]")
    assert run_snakemake(project, "-n", "results/subset_0.5.json").returncode == 0  # selecting needs no target
    result = run_snakemake(project, "-n", "results/target/full/1/seed-0")
    said = result.stdout + result.stderr
    assert result.returncode != 0 and "config alignment.captions: `demo`" in said
    assert "this dataset is not generated: set alignment.captions to a caption file of your own" in said


@pytest.mark.slow
def test_save_every_steps_sets_the_trajectory_length_once_prepare_has_counted_the_records(tmp_path):
    # 300 records, batches of 32, one epoch: 10 steps; a checkpoint every 4 steps: at 4, 8 and 10
    project = reduced_project(tmp_path, training={**REDUCED_DEMO["training"], "save_every_steps": 4})
    dry = job_counts(snakemake(project, "-n", "results/trajectories.parquet").stdout)
    assert dry["prepare"] == 1 and "trajectory" not in dry  # the rest is planned once prepare has run
    snakemake(project, "--cores", "2", "results/trajectories.parquet")
    trajectories = pd.read_parquet(project / "results/trajectories.parquet")
    assert sorted(trajectories.checkpoint.unique()) == [1, 2, 3]
    steps = [json.loads((project / f"logs/stats/proxy/checkpoint-{c}.json").read_text())["step"] for c in (1, 2, 3)]
    assert steps == [4, 8, 10]


def test_dry_run_of_the_loss_baseline_runs_its_own_trajectories(tmp_path):
    selection = {**REDUCED_DEMO["selection"], "methods": ["xmas", "loss"]}
    project = reduced_project(tmp_path / "with-loss", selection=selection)
    counts = job_counts(snakemake(project, "-n", "results/loss/seed-0/subset_0.5.json").stdout)
    assert counts["trajectory_loss"] == 6 and counts["merge_loss"] == counts["cluster_loss"] == 1
    assert "trajectory" not in counts and counts["train_segment"] == 3
    # a run that does not select with it has no rules for its signal, and says so
    unlisted = run_snakemake(reduced_project(tmp_path / "without"), "-n", "results/loss/seed-0/subset_0.5.json")
    assert unlisted.returncode != 0
    said = unlisted.stdout + unlisted.stderr
    assert "selection.methods lists such a method" in said and "add 'loss' to it" in said


@pytest.mark.slow
def test_evaluation_summary_of_the_reduced_demo(workflow_run):
    # --forcerun: the report may have built the summary already; the table must print again.
    result = snakemake(workflow_run, "--cores", "2", "--forcerun", "summarize", "results/eval/summary.tsv")
    summary = pd.read_csv(workflow_run / "results/eval/summary.tsv", sep="\t", dtype={"budget": str})
    types = sorted({r["question_type"] for r in read_all(workflow_run / "results/demo/test.json")})
    runs = summary.groupby(["method", "budget", "seed"]).benchmark.apply(sorted)
    assert runs.to_dict() == {
        (m, b, 0): types
        for m, b in [
            ("xmas", "0.5"),
            ("xmas-proportional", "0.5"),
            ("random", "0.5"),
            ("cluster-random", "0.5"),
            ("coincide", "0.5"),
            ("semdedup", "0.5"),
            ("full", "1"),
        ]
    }
    full = summary[summary.method == "full"]
    assert full.ARP.iloc[0] == pytest.approx(100.0)  # one seed: the full run is its own reference
    table = (workflow_run / "results/eval/summary.txt").read_text()
    assert "ARP" in table and "cluster-random" in table and table in result.stdout
    finetuned = json.loads((workflow_run / "results/target/xmas/0.5/seed-0/xmas_finetune.json").read_text())
    subset = json.loads((workflow_run / "results/subset_0.5.json").read_text())
    assert finetuned["records"] == len(subset)
    assert finetuned["base"] == str((workflow_run / "results/target/aligned").resolve())  # aligned once, shared


@pytest.mark.slow
def test_a_reference_named_by_preset_is_composed_and_the_proxy_never_trains_for_it(tmp_path):
    """features.reference other than `proxy`: reference_init composes it as proxy_init composes checkpoint 0,
    and the feature methods select without any proxy training."""
    project = reduced_project(
        tmp_path, selection={"budgets": [0.5], "methods": ["coincide", "semdedup"]}, features={"reference": "demo-tiny"}
    )
    targets = ["results/coincide/seed-0/subset_0.5.json", "results/semdedup/seed-0/subset_0.5.json"]
    counts = job_counts(snakemake(project, "-n", *targets).stdout)
    assert counts["reference_init"] == 1 and counts["features"] == 2 and "train_segment" not in counts
    snakemake(project, "--cores", "2", *targets)
    assert (project / "results/reference/config.json").is_file()
    assert not (project / "results/proxy/checkpoint-1").exists()
    log = (project / "logs/features/shard-0.log").read_text()
    assert "features shard 0 done" in log
    for target in targets:
        assert json.loads((project / target).read_text())
