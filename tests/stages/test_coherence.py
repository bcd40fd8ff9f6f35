"""Rule coherence: per-example gradients, count-sketched, compared inside and across clusters and against
random groupings."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch

from xmas.data.annotations import SourceRecords
from xmas.data.examples import TEXT_ONLY, usable_image_examples
from xmas.io import write_parquet
from xmas.models.checkpoints import load_checkpoint
from xmas.models.encoding import ConversationEncoder
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages.coherence import GradientSketch, coherence, measure, pair_means


def test_pair_means_are_those_of_every_pair():
    rng = np.random.default_rng(0)
    cosine = rng.uniform(-1, 1, (7, 7))
    labels = np.array([0, 1, 0, 2, 1, 0, 2])
    pairs = list(itertools.combinations(range(7), 2))
    inside = np.mean([cosine[i, j] for i, j in pairs if labels[i] == labels[j]])
    across = np.mean([cosine[i, j] for i, j in pairs if labels[i] != labels[j]])
    assert np.allclose(pair_means(cosine, labels), (inside, across))


def test_coherent_clusters_stand_out_from_random_groupings_and_random_ones_do_not():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(6, 64))
    labels = np.repeat(np.arange(6), 8)
    gradients = centres[labels] + 0.5 * rng.normal(size=(48, 64))
    grouped = coherence(gradients, labels, groupings=20, seed=0)
    assert grouped["gap"] > grouped["random_gap"]["mean"] + 5 * grouped["random_gap"]["sd"]
    shuffled = coherence(gradients, rng.permutation(labels), groupings=20, seed=0)
    assert abs(shuffled["gap"] - shuffled["random_gap"]["mean"]) < 3 * shuffled["random_gap"]["sd"] + 0.05
    assert sum(grouped["histogram"]["inside"]) == 6 * 28 and sum(grouped["histogram"]["across"]) == 48 * 47 // 2 - 168


def test_the_sketch_is_the_full_gradients_count_sketch_and_keeps_its_cosines(
    tiny_checkpoint, small_demo, small_examples
):
    model, processor = load_checkpoint(tiny_checkpoint)
    model.eval()
    encoder = ConversationEncoder.of_checkpoint(tiny_checkpoint, processor, small_demo["images"])
    records = SourceRecords(small_demo["train"], usable_image_examples(small_examples).iloc[:4])[:]
    sketch = GradientSketch(model, encoder, 4096, seed=0)
    sketches, full = [], []
    for record in records:
        sketches.append(sketch(record))
        grads = [torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in sketch.parameters]
        full.append(torch.cat(grads).numpy().astype(np.float64))
    total = sum(p.numel() for p in sketch.parameters)
    buckets, signs = (values.numpy() for values in sketch.hashed(0, total, "cpu"))  # what it hashes as it goes
    assert np.bincount(buckets, minlength=4096).min() > 0 and abs(signs.mean()) < 0.02  # spread, balanced
    sketch.CHUNK = 1000  # hashed a chunk at a time, a parameter's chunks continuing its positions: the same sketch
    np.testing.assert_allclose(sketch(records[-1]), sketches[-1], rtol=1e-5, atol=1e-7)
    for got, gradient in zip(sketches, full):
        np.testing.assert_allclose(
            got, np.bincount(buckets, weights=signs * gradient, minlength=4096), rtol=1e-4, atol=1e-6
        )

    def cosines(rows):
        unit = np.array(rows) / np.linalg.norm(rows, axis=1, keepdims=True)
        return unit @ unit.T

    assert np.abs(cosines(sketches) - cosines(full)).max() < 0.1  # 4,096 dimensions of about 10^5
    assert sum(p.numel() for p in sketch.parameters) > 20 * 4096


def test_the_stage_measures_clusters_of_the_small_demo(tiny_checkpoint, small_demo, small_examples, tmp_path):
    usable = usable_image_examples(small_examples)
    clusters = pd.DataFrame({"uid": usable.uid, "cluster": np.arange(len(usable)) % 5})
    clusters.loc[clusters.index[:3], "cluster"] = TEXT_ONLY  # as text-only rows of clusters.parquet read
    write_parquet(clusters, tmp_path / "clusters.parquet")
    settings = stage_defaults("coherence", gradients=12, per_cluster=4, dimensions=256, groupings=5)
    stats = StageStats("t")
    result = measure(
        tiny_checkpoint, small_examples, tmp_path / "clusters.parquet", small_demo["train"], small_demo["images"],
        settings, stats,
    )  # fmt: skip
    assert result["examples"] == 12 and result["clusters"] == 3 and result["dimensions"] == 256
    assert -1 <= result["inside"] <= 1 and -1 <= result["across"] <= 1 and result["random_gap"]["sd"] >= 0
    assert stats.counts["in"] == 12


def test_auto_runs_the_diagnostic_on_generated_data_only(tmp_path):
    """coherence.enabled: auto (the default) plans it for the demo, not for data of one's own, unless true."""
    from conftest import job_counts, snakemake

    own = tmp_path / "data"
    (own / "images").mkdir(parents=True)
    (own / "train.json").write_text('[{"id": "a", "conversations": [{"from": "human", "value": "hi"}]}]')
    dataset = f"dataset: {{annotations: {own / 'train.json'}, image_root: {own / 'images'}}}\n"
    plans = {}
    for name, config in {"demo": "", "own": dataset, "own, enabled": dataset + "coherence: {enabled: true}\n"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(config or "{}\n")
        plans[name] = job_counts(snakemake(tmp_path / name, "-n", "results/report.html").stdout).get("coherence", 0)
    assert plans == {"demo": 1, "own": 0, "own, enabled": 1}
