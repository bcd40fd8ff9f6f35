"""The rehearsal with today's models (config/modern.yaml): a SmolVLM proxy selects for a Qwen2.5-VL target,
the whole DAG on their stand-ins, on CPU."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from xmas.data.annotations import SourceRecords
from xmas.models.checkpoints import load_checkpoint, load_processor
from xmas.models.encoding import ConversationEncoder
from xmas.models.families import family_of

from conftest import REPO, job_counts, snakemake

MODERN = str(REPO / "config/modern.yaml")
TARGETS = ["results/eval/summary.tsv", "results/report.html"]


def test_the_modern_rehearsal_plans_every_stage_with_the_target_presets_recipe(tmp_path):
    result = snakemake(tmp_path, "-n", "-p", *TARGETS, "--configfile", MODERN)
    counts = job_counts(result.stdout)
    assert counts["standin_model"] == 2 and counts["trajectory"] == 5 * 2
    assert counts["finetune_target"] == counts["evaluate"] == 2 * 3 + 1
    finetune = next(line for line in result.stdout.splitlines() if "Shell command: xmas finetune-target" in line)
    # qwen2.5-vl-7b's recipe (LLaMA-Factory's) over the schema's defaults; the config's own values over both
    assert "--learning-rate 0.0001 " in finetune and "--lora-r 8 --lora-alpha 16 --lora-dropout 0.0" in finetune
    assert "--batch-size 32 " in finetune


def test_a_setting_the_config_gives_wins_over_the_presets_recipe(tmp_path):
    (tmp_path / "mine.yaml").write_text("target: {lora_r: 64}\n")
    result = snakemake(
        tmp_path,
        "-n",
        "-p",
        "results/eval/runs/xmas/0.5/seed-0.tsv",
        "--configfile",
        MODERN,
        str(tmp_path / "mine.yaml"),
    )
    finetune = next(line for line in result.stdout.splitlines() if "Shell command: xmas finetune-target" in line)
    assert "--lora-r 64 --lora-alpha 16 " in finetune


@pytest.fixture(scope="module")
def modern(tmp_path_factory):
    project = tmp_path_factory.mktemp("modern")
    snakemake(project, "--cores", "2", *TARGETS, "--configfile", MODERN, timeout=2400)
    return project


def stats(project, name: str) -> dict:
    return json.loads((project / "logs/stats" / f"{name}.json").read_text())


@pytest.mark.slow
def test_a_smolvlm_proxy_selects_for_a_qwen_target_through_the_whole_dag(modern):
    proxy, _ = load_checkpoint(modern / "results/proxy/checkpoint-5")
    target, _ = load_checkpoint(modern / "results/target/base")
    assert (family_of(proxy).name, family_of(target).name) == ("idefics3", "qwen2_5_vl")
    summary = pd.read_csv(modern / "results/eval/summary.tsv", sep="\t")
    assert len(summary.drop_duplicates(["method", "budget", "seed"])) == 7
    first_screen = (modern / "results/report.html").read_text().split("<h2>Subsets</h2>")[0]
    assert "Proxy: smolvlm-256m (idefics3, " in first_screen and "its own chat template" in first_screen
    assert "Target: qwen2.5-vl-7b" in first_screen  # described in full once its checkpoint 0 is made
    for budget in ("0.2", "0.5"):
        sampled = stats(modern, f"sample/xmas/seed-0/{budget}")
        assert sampled["counts"]["selected"] == sampled["counts"]["target"], budget
    adapter = json.loads((modern / "results/target/xmas/0.5/seed-0/adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 16)


@pytest.mark.slow
def test_prepare_counted_each_images_tokens_for_the_smolvlm_proxy(modern):
    examples = pd.read_parquet(modern / "results/data/examples.parquet")
    assert stats(modern, "prepare")["excluded"] == {"image_cut_by_max_length": 1, "too_many_images": 1}
    usable = examples[(examples.status == "ok") & examples.has_image].head(40)
    encoder = ConversationEncoder.of_checkpoint(
        modern / "results/proxy/checkpoint-0", image_root=modern / "results/demo/images"
    )
    with SourceRecords(modern / "results/demo/train.json", usable) as records:
        for record, tokens in zip(records[:], usable.tokens):
            assert len(encoder.encode(record, with_labels=False)["input_ids"]) == min(tokens, 2048), record["id"]
    runs = {encoder.images.run(*size).image_tokens for size in ((96, 40), (40, 96), (64, 64))}
    assert len(runs) > 1  # tiles follow each photo's shape


@pytest.mark.slow
def test_the_pixel_bounds_of_checkpoint_0_reach_every_checkpoint_trained_from_it(modern):
    def size(folder):
        return dict(load_processor(modern / folder).image_processor.size)

    target = size("results/target/base")
    assert target == {"shortest_edge": 1024, "longest_edge": 262144}  # the target preset's min/max_pixels
    assert size("results/target/xmas/0.5/seed-0") == size("results/target/full/1/seed-0") == target
    assert size("results/proxy/checkpoint-5") == size("results/proxy/checkpoint-0")
