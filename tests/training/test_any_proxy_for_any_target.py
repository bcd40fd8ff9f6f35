"""Any supported proxy selects for any supported target: every family as the proxy (checkpoint 0, two training
segments, trajectories, clusters, XMAS's subset) and every family as the target of another's subset (checkpoint
0, a LoRA fine-tune, an exact-match evaluation), on their stand-ins. The families pair round a circle, so each is
a proxy once and a target once, of families other than itself."""

from __future__ import annotations

import pandas as pd
import pytest
from test_family_training import LORA, SEGMENT, TRAJECTORY

from xmas.data.annotations import read_all
from xmas.data.examples import shard_slice, usable_image_examples
from xmas.io import write_parquet, write_records
from xmas.models.checkpoints import load_target
from xmas.models.families import FAMILIES, family_of
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages.cluster import cluster
from xmas.stages.evaluate import evaluate_exact_match
from xmas.stages.merge import merge
from xmas.stages.prepare import prepare
from xmas.stages.sample import sample, write_subset
from xmas.stages.train_segment import train_segment
from xmas.stages.trajectory import extract_shard
from xmas.training.finetune import finetune

from conftest import MODERN_FAMILIES

FAMILY_NAMES = ["llava", *MODERN_FAMILIES]  # the paper's TinyLLaVA for the Llava family
PAIRS = list(zip(FAMILY_NAMES, FAMILY_NAMES[1:] + FAMILY_NAMES[:1]))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(modern_checkpoints, standins, varied_data, tmp_path_factory) -> dict:
    """Checkpoint 0 of every family: today's (modern_checkpoints) and TinyLLaVA composed from its stand-ins."""
    from xmas.models.presets import init_model, load_presets

    tinyllava = tmp_path_factory.mktemp("llava") / "checkpoint-0"
    settings = stage_defaults("proxy-init", model="tinyllava-stablelm2-clip336", model_paths=standins, max_length=2048)
    init_model(settings, load_presets(), [varied_data["train"]], tinyllava, StageStats("t"))
    return {**modern_checkpoints, "llava": tinyllava}


def select(checkpoint, varied_data, work) -> tuple:
    """The proxy's way to XMAS's half of the records: its subset and manifest."""
    examples = prepare(varied_data["train"], varied_data["images"], stage_defaults("prepare"), 1, StageStats("t"),
                       checkpoint)  # fmt: skip
    write_parquet(examples, work / "examples.parquet")
    previous, shards = checkpoint, []
    for number in (1, 2):
        trained = work / f"checkpoint-{number}"
        train_segment(previous, trained, number, SEGMENT, work / "examples.parquet", varied_data["train"],
                      varied_data["images"], StageStats("t"))  # fmt: skip
        shard = shard_slice(usable_image_examples(work / "examples.parquet"), 0, 1)
        shards.append(work / f"trajectories-{number}.parquet")
        extract_shard(trained, number, shard, varied_data["train"], varied_data["images"], shards[-1], TRAJECTORY,
                      "attention", StageStats("t"))  # fmt: skip
        previous = trained
    write_parquet(merge(shards, work / "examples.parquet", 2, 1, StageStats("t")), work / "trajectories.parquet")
    settings = stage_defaults("cluster", clusters=2, min_cluster_size=1)
    clusters = cluster(work / "examples.parquet", work / "trajectories.parquet", settings, StageStats("t"))
    write_parquet(clusters, work / "clusters.parquet")
    manifest = sample("xmas", "0.5", work / "examples.parquet", work / "clusters.parquet", 0, StageStats("t"),
                      stage_defaults("sample", min_cluster_size=1))  # fmt: skip
    written = write_subset(varied_data["train"], work / "examples.parquet", manifest, work / "subset.json")
    return work / "subset.json", manifest, written


@pytest.mark.parametrize(("proxy", "target"), PAIRS, ids=[f"{proxy}-for-{target}" for proxy, target in PAIRS])
def test_the_proxy_selects_a_subset_the_target_fine_tunes_on_and_is_evaluated_after(
    proxy, target, checkpoints, varied_data, tmp_path
):
    assert set(FAMILY_NAMES) == set(FAMILIES)  # every family, as proxy and as target
    subset, manifest, written = select(checkpoints[proxy], varied_data, tmp_path)
    usable = len(read_all(varied_data["train"]))
    assert written == manifest.selected.sum() == round(0.5 * usable) and len(manifest) == usable
    chosen = read_all(subset)
    assert any(record.get("image") for record in chosen)  # the attention signal picked image records

    base, stats = checkpoints[target], StageStats("t")
    finetune(base, subset, varied_data["images"], tmp_path / "target", LORA, 0, stats)
    model, processor = load_target(tmp_path / "target")
    assert family_of(model).name == family_of(processor).name == target
    assert stats.as_dict()["counts"]["in"] == written  # the target trained on every record the proxy chose
    test = tmp_path / "test.json"
    write_records([record for record in read_all(varied_data["train"]) if record.get("image")][:3], test)
    scores, predictions = evaluate_exact_match(tmp_path / "target", test, varied_data["images"], 2, 4, StageStats("t"))
    assert scores.n.sum() == 3 and isinstance(scores, pd.DataFrame) and predictions.answer.map(type).eq(str).all()
