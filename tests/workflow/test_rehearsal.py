"""The rehearsal of a real LLaVA-665k run (config/rehearsal.yaml): the paper's whole DAG on stand-ins
of the real models and a small LLaVA-665k-shaped dataset, on CPU."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import REPO, job_counts, snakemake

# What the rehearsal may change in config/llava665k.yaml: the data, where models are loaded from,
# and what a CPU without GPUs or benchmark datasets needs. Anything else must stay the paper's.
REHEARSAL_CHANGES = {
    "dataset.download",
    "dataset.demo",
    "model_paths",
    "training.threads",
    "training.gpus",
    "trajectory.threads",
    "trajectory.gpus",
    "features.threads",
    "features.gpus",
    "features.cluster_threads",
    "coherence.gpus",
    "target.threads",
    "target.gpus",
    "target.deepspeed",
    "evaluation.suite",
    "evaluation.batch_size",
    "evaluation.threads",
    "evaluation.gpus",
    "resources",
}
TARGETS = ["results/eval/summary.tsv", "results/report.html"]


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and key != "model_paths":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_the_rehearsal_is_the_paper_config_with_only_models_data_and_cpu_changed():
    paper = flatten(yaml.safe_load((REPO / "config/llava665k.yaml").read_text()))
    rehearsal = flatten(yaml.safe_load((REPO / "config/rehearsal.yaml").read_text()))
    changed = {key for key in paper.keys() | rehearsal.keys() if paper.get(key) != rehearsal.get(key)}
    unexpected = {key for key in changed if key not in REHEARSAL_CHANGES and key.split(".")[0] not in REHEARSAL_CHANGES}
    assert not unexpected, sorted(unexpected)
    assert {"dataset.download", "model_paths"} <= changed


REHEARSAL = str(REPO / "config/rehearsal.yaml")


def test_the_rehearsal_plans_the_papers_jobs(tmp_path):
    counts = job_counts(snakemake(tmp_path, "-n", *TARGETS, "--configfile", REHEARSAL).stdout)
    assert counts["standin_model"] == 4 and counts["trajectory"] == 5 * 8
    assert counts["finetune_target"] == counts["evaluate"] == 4 * 3 + 1


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    project = tmp_path_factory.mktemp("rehearsal")
    result = snakemake(project, "--cores", "2", *TARGETS, "--configfile", REHEARSAL, timeout=2400)
    return project, result


def stats(project, name: str) -> dict:
    return json.loads((project / "logs/stats" / f"{name}.json").read_text())


@pytest.mark.slow
def test_the_rehearsal_runs_the_papers_dag_on_stand_ins(rehearsal):
    project, result = rehearsal
    assert "Finished jobid: 0" in result.stderr + result.stdout
    prepared = stats(project, "prepare")
    assert prepared["excluded"] == {"image_cut_by_max_length": 1, "too_many_images": 1}
    assert prepared["counts"]["truncated"] >= 4 and prepared["max_length"] == 2048
    summary = pd.read_csv(project / "results/eval/summary.tsv", sep="\t")
    assert len(summary.drop_duplicates(["method", "budget", "seed"])) == 13
    assert (project / "results/report.html").stat().st_size > 0


@pytest.mark.slow
def test_the_rehearsals_models_follow_the_recipes(rehearsal):
    from transformers import AutoProcessor

    from xmas.models.presets import chat_template

    project, _ = rehearsal
    proxy = AutoProcessor.from_pretrained(project / "results/proxy/checkpoint-5")
    target = AutoProcessor.from_pretrained(project / "results/target/base")
    assert proxy.chat_template == chat_template("phi") and target.chat_template == chat_template("vicuna_v1")
    assert target.image_processor.do_pad and proxy.image_processor.do_center_crop
    vicuna = target.tokenizer  # Vicuna's: adds BOS; its pad is <unk>, as LLaVA sets it
    assert vicuna("Hi")["input_ids"][0] == vicuna.bos_token_id and vicuna.pad_token == "<unk>"
    tuned = stats(project, "target/xmas/0.5/seed-0")
    assert tuned["trainable_parameters"] > 0 and tuned["counts"]["steps"] >= 1
    assert json.loads((project / "results/target/xmas/0.5/seed-0/adapter_config.json").read_text())["r"] == 128


@pytest.mark.slow
def test_the_rehearsals_subsets_reach_their_budgets(rehearsal):
    project, _ = rehearsal
    clustered = stats(project, "cluster")
    assert clustered["clusters"] < 1000  # the paper's K, capped to what the small set can fill
    for budget in ("0.1", "0.2", "0.3", "0.5"):
        sampled = stats(project, f"sample/xmas/seed-0/{budget}")
        assert sampled["counts"]["selected"] == sampled["counts"]["target"], budget
