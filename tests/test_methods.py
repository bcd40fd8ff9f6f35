"""The selection methods, declared once (xmas/methods.py): the workflow, `xmas sample` and the docs follow."""

from __future__ import annotations

import re

from xmas.methods import METHODS, SELECTABLE, SIGNALS
from xmas.settings import load_schema

from conftest import run_snakemake, snakemake


def test_the_config_takes_exactly_the_methods_one_can_select(tmp_path):
    assert load_schema()["properties"]["selection"]["properties"]["methods"]["x-choices"] == "methods"
    (tmp_path / "config.yaml").write_text("selection: {methods: [xmas, d2-prune]}\n")
    result = run_snakemake(tmp_path, "-n", "results/subset_0.5.json")
    assert result.returncode != 0
    message = "'d2-prune' is not a selection method; choose from " + ", ".join(SELECTABLE)
    assert message in result.stdout + result.stderr
    assert "full" in METHODS and "full" not in SELECTABLE  # the evaluation's reference, not a selection


def sample_jobs(dry_run: str) -> dict[str, list[str]]:
    """xmas sample's command line per method and seed in a dry run's printed shell commands."""
    jobs = {}
    for command in re.findall(r"^Shell command: (xmas sample .*)$", dry_run, re.MULTILINE):
        method, seed = re.search(r"--method (\S+)", command)[1], re.search(r"--seed (\d+)", command)[1]
        jobs.setdefault(method, []).append((seed, command))
    return jobs


def test_each_method_is_planned_from_its_declaration(tmp_path):
    (tmp_path / "config.yaml").write_text(
        f"selection: {{methods: [{', '.join(SELECTABLE)}], budgets: [0.5]}}\nevaluation: {{seeds: [0, 1]}}\n"
    )
    jobs = sample_jobs(snakemake(tmp_path, "-n", "-p", "results/eval/summary.tsv").stdout)
    assert set(jobs) == set(METHODS)
    for name, method in METHODS.items():
        seeds = {seed for seed, _ in jobs[name]}
        assert seeds == ({"0", "1"} if method.seeded else {"0"}), name
        for _, command in jobs[name]:
            clusters = re.search(r"--clusters (\S+)", command)
            centroids = re.search(r"--centroids (\S+)", command)
            if method.features:
                assert clusters[1] == f"results/{name}/selection/clusters.parquet", name
                assert centroids[1] == f"results/{name}/selection/centroids.parquet", name
                continue
            assert centroids is None, name
            if method.signal is None:
                assert clusters is None, name
            else:
                folder = "results" if method.signal == "attention" else f"results/{method.signal}"
                assert clusters[1] == f"{folder}/selection/clusters.parquet", name


def test_every_signal_of_a_method_has_trajectories():
    assert {method.signal for method in METHODS.values()} - {None} == set(SIGNALS)


def test_every_feature_is_a_methods_and_is_computed():
    from xmas.methods import FEATURES

    assert [method.features for method in METHODS.values() if method.features] == list(FEATURES)


def test_every_feature_has_its_rule_its_clusters_and_its_extraction(tiny_checkpoint):
    """What a feature method needs beyond its entry in xmas/methods.py, each checked against FEATURES: its rule
    (xmas/selection/<feature>.py, whose choose the sample stage calls), its K (features.<feature>_clusters) and
    its column of the features jobs' output."""
    import inspect

    from xmas.methods import FEATURES
    from xmas.selection import rule_of
    from xmas.stages.features import reference_shape

    schema = load_schema()["properties"]["features"]["properties"]
    for feature in FEATURES:
        choose = rule_of(feature).choose
        assert list(inspect.signature(choose).parameters) == [
            "features", "clusters", "centroids", "budget", "metadata", "settings"
        ], feature  # fmt: skip
        assert "cluster-features" in schema[f"{feature}_clusters"]["x-stages"], feature
    assert list(reference_shape(tiny_checkpoint, None)[1]) == list(FEATURES)
