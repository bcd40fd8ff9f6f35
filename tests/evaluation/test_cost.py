"""What the selection cost (xmas.evaluation.cost): every job's seconds as its stats record them, summed per
stage and per method, against a full-data fine-tune of the target."""

from __future__ import annotations

import json
import time

import pytest

from xmas.evaluation.cost import method_costs, stage_costs
from xmas.progress import StageStats


def test_a_jobs_stats_record_its_cpu_seconds_and_no_gpu_on_a_cpu(tmp_path):
    import torch

    stats = StageStats("busy")
    start = time.process_time()
    torch.randn(512, 512) @ torch.randn(512, 512)  # torch imported and used, CUDA never initialised
    while time.process_time() - start < 0.3:
        pass
    recorded = stats.finish(tmp_path / "busy.json")
    assert recorded["cpu_seconds"] >= 0.3 and recorded["gpus"] == 0
    assert json.loads((tmp_path / "busy.json").read_text())["cpu_seconds"] == recorded["cpu_seconds"]


def write_stats(root, path: str, seconds: float, cpu: float, gpus: int = 0) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(json.dumps({"stage": path, "seconds": seconds, "cpu_seconds": cpu, "gpus": gpus}))


@pytest.fixture
def stats_dir(tmp_path):
    """The stats a run of xmas, loss and random leaves (as workflow/rules/*.smk name them), with two full-data
    fine-tunes of the target."""
    jobs = {
        "proxy/checkpoint-0.json": (4, 3),
        "prepare.json": (6, 5),
        "proxy/checkpoint-1.json": (100, 90),
        "proxy/checkpoint-2.json": (100, 90),
        "trajectories/checkpoint-1/shard-0.json": (20, 15),
        "trajectories/checkpoint-2/shard-0.json": (20, 15),
        "merge.json": (1, 1),
        "cluster.json": (2, 2),
        "loss/trajectories/checkpoint-1/shard-0.json": (30, 25),
        "loss/merge.json": (1, 1),
        "loss/cluster.json": (2, 2),
        "features/shard-0.json": (12, 10),
        "features/shard-1.json": (12, 10),
        "coincide/cluster.json": (3, 3),
        "semdedup/cluster.json": (2, 1),
        "coherence.json": (7, 7),  # a diagnostic, no method's cost
        "sample/xmas/seed-0/0.5.json": (1, 1),
        "sample/coincide/seed-0/0.5.json": (1, 1),
        "sample/semdedup/seed-0/0.5.json": (1, 1),
        "sample/loss/seed-0/0.5.json": (1, 1),
        "sample/random/seed-0/0.5.json": (1, 1),
        "sample/random/seed-1/0.5.json": (1, 1),
        "target/full/1/seed-0.json": (600, 500),
        "target/full/1/seed-1.json": (400, 300),
        "target/xmas/0.5/seed-0.json": (300, 250),  # not a selection cost
        "standins/vicuna.json": (9, 9),  # nor this
    }
    for path, (seconds, cpu) in jobs.items():
        write_stats(tmp_path, path, seconds, cpu)
    return tmp_path


def test_each_method_costs_the_stages_it_needs_against_a_full_fine_tune(stats_dir):
    stages = stage_costs(stats_dir, ["xmas", "loss", "random"])
    assert stages.loc["proxy training"].to_dict() == {"jobs": 2, "wall s": 200, "CPU s": 180, "GPU s": 0}
    assert stages.loc["sample random", "jobs"] == 2 and "target" not in " ".join(stages.index)
    costs = method_costs(stats_dir, ["xmas", "loss", "random"]).set_index("method")
    shared = 3 + 5  # checkpoint 0 and prepare: every method's
    assert costs["CPU s"].to_dict() == {
        "xmas": shared + 180 + 30 + 1 + 2 + 1,
        "loss": shared + 180 + 25 + 1 + 2 + 1,
        "random": shared + 2,
    }
    assert costs.loc["xmas", "× a full fine-tune"] == round((shared + 214) / 400, 3)  # the mean of 500 and 300


def test_the_feature_methods_cost_their_reference_features_not_the_proxys_training(stats_dir):
    costs = method_costs(stats_dir, ["xmas", "coincide", "semdedup"]).set_index("method")
    shared = 3 + 5
    assert costs["CPU s"].to_dict() == {
        "xmas": shared + 180 + 30 + 1 + 2 + 1,
        "coincide": shared + 20 + 3 + 1,
        "semdedup": shared + 20 + 1 + 1,
    }
    assert stage_costs(stats_dir, ["coincide"]).loc["reference features", "jobs"] == 2


def test_costs_compare_in_gpu_seconds_once_a_job_used_a_gpu(stats_dir):
    write_stats(stats_dir, "proxy/checkpoint-1.json", 100, 90, gpus=8)
    write_stats(stats_dir, "target/full/1/seed-0.json", 600, 500, gpus=8)
    write_stats(stats_dir, "target/full/1/seed-1.json", 400, 300, gpus=8)
    costs = method_costs(stats_dir, ["xmas", "random"]).set_index("method")
    assert costs["GPU s"].to_dict() == {"xmas": 800, "random": 0}
    assert costs.loc["xmas", "× a full fine-tune"] == round(800 / 4000, 3)


def test_without_a_full_fine_tune_there_is_no_ratio(stats_dir):
    for path in (stats_dir / "target/full").rglob("*.json"):
        path.unlink()
    assert "× a full fine-tune" not in method_costs(stats_dir, ["xmas"]).columns


def test_every_selection_job_of_the_workflow_counts_to_a_stage(tmp_path):
    """The stages are derived from the signals and features (xmas.methods): every stats file a selection job of
    the workflow writes (a dry run of every method, with a reference composed from a preset) falls in one."""
    import fnmatch
    import re

    from xmas.evaluation.cost import STAGES
    from xmas.methods import SELECTABLE

    from conftest import snakemake

    (tmp_path / "config.yaml").write_text(
        f"selection: {{methods: [{', '.join(SELECTABLE)}], budgets: [0.5]}}\nfeatures: {{reference: demo-tiny}}\n"
    )
    dry_run = snakemake(tmp_path, "-n", "-p", "results/report.html").stdout
    written = set(re.findall(r"--stats logs/stats/(\S+\.json)", dry_run))
    not_selection = ("demo_data", "sample/", "coherence", "report")
    selection = {path for path in written if not path.startswith(not_selection)}
    assert {"reference.json", "loss/cluster.json", "semdedup/cluster.json"} <= selection
    uncounted = [path for path in selection if not any(fnmatch.fnmatch(path, stage.pattern) for stage in STAGES)]
    assert not uncounted, uncounted
