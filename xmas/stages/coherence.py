"""Rule ``coherence``: does XMAS's premise hold on this data? XMAS rests on examples with similar attention
trajectories having similar gradients. This takes a few hundred image examples from randomly chosen
clusters, computes each one's gradient of its loss on the proxy at a checkpoint, projects them to a few
thousand dimensions (a count sketch: each parameter element adds its gradient, signed at random, to a random
one of the dimensions, which keeps inner products in expectation), on the job's GPU when it has one, and
compares the mean cosine similarity of pairs inside a cluster with that of pairs across clusters, and with
the same for random groupings of the same sizes (``results/selection/coherence.json``). A gap
inside-minus-across well above the random groupings' says the clusters mean something for training on this
data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from xmas.data.examples import TEXT_ONLY, usable_image_examples
from xmas.data.sources import Source, as_source, stage_source
from xmas.errors import XmasError
from xmas.io import read_parquet, write_json
from xmas.models.checkpoints import load_checkpoint
from xmas.models.encoding import ConversationEncoder
from xmas.progress import StageStats, add_input_arguments, add_threads_argument, progress, use_threads
from xmas.settings import add_settings, settings_of
from xmas.training.engine import compute_device

BINS = np.linspace(-1.0, 1.0, 41)  # of the pairs' cosine similarities, for the report's figure


def chosen_examples(usable: pd.DataFrame, clusters: pd.DataFrame, examples: int, per_cluster: int, seed: int):
    """Up to ``per_cluster`` image examples from each of randomly ordered clusters (those with two or more),
    until ``examples``: the rows (uid, index, ..., cluster) in source order."""
    rng = np.random.default_rng(seed)
    labelled = usable.merge(clusters[["uid", "cluster"]], on="uid")
    labelled = labelled[labelled.cluster != TEXT_ONLY]
    sizes = labelled.cluster.value_counts()
    picked = []
    for cluster in rng.permutation(np.sort(sizes.index[sizes >= 2].to_numpy())):
        members = labelled[labelled.cluster == cluster]
        take = min(per_cluster, len(members), examples - sum(map(len, picked)))
        if take < 2:
            break
        picked.append(members.iloc[np.sort(rng.choice(len(members), size=take, replace=False))])
    if len(picked) < 2:
        raise XmasError("gradient coherence needs two clusters of two image examples or more")
    return pd.concat(picked).sort_values("index")


class GradientSketch:
    """Each example's gradient of its loss, count-sketched to ``dimensions``. A parameter element's bucket and sign
    are hashes of its position among all of the model's trainable elements (multiply-shift hashing with odd
    multipliers drawn from ``seed``, pairwise independent as a count sketch needs), computed as they are used:
    nothing per element is kept, so the sketch of a 2B-parameter proxy costs no memory of its own beyond a chunk's."""

    CHUNK = 1 << 24  # elements hashed at a time

    def __init__(self, model, encoder: ConversationEncoder, dimensions: int, seed: int):
        self.model, self.encoder, self.dimensions = model, encoder, dimensions
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.offsets = np.cumsum([0] + [p.numel() for p in self.parameters[:-1]]).tolist()
        odd = np.random.default_rng(seed).integers(1, 1 << 62, size=2) * 2 + 1
        self.bucket_multiplier, self.sign_multiplier = (int(value) for value in odd)

    def hashed(self, start: int, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets and signs of the elements ``start .. start + count - 1`` (int64 products wrap modulo 2**64)."""
        position = torch.arange(start, start + count, device=device, dtype=torch.int64)
        high = ((position * self.bucket_multiplier) >> 32) & 0xFFFFFFFF  # the product's high 32 bits
        sign = (position * self.sign_multiplier < 0).to(torch.float32) * 2 - 1  # its top bit
        return high % self.dimensions, sign

    def __call__(self, record: dict) -> np.ndarray:
        self.model.zero_grad(set_to_none=True)
        self.model(**self.encoder([record], with_labels=True)).loss.backward()
        sketch = torch.zeros(self.dimensions, device=self.parameters[0].device)
        for parameter, offset in zip(self.parameters, self.offsets):
            if parameter.grad is None:
                continue
            gradient = parameter.grad.flatten()
            for start in range(0, gradient.numel(), self.CHUNK):
                part = gradient[start : start + self.CHUNK].float()
                bucket, sign = self.hashed(offset + start, part.numel(), part.device)
                sketch.index_add_(0, bucket, part * sign)
        return sketch.cpu().numpy()


def pair_means(cosine: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean cosine of the pairs with the same label, and of those with different labels."""
    upper = np.triu(np.ones_like(cosine, dtype=bool), k=1)
    same = (labels[:, None] == labels[None, :]) & upper
    return float(cosine[same].mean()), float(cosine[upper & ~same].mean())


def coherence(sketches: np.ndarray, labels: np.ndarray, groupings: int, seed: int) -> dict:
    """Inside- and across-cluster mean cosines of the gradients, against random groupings of the same sizes."""
    unit = sketches / np.maximum(np.linalg.norm(sketches, axis=1, keepdims=True), 1e-30)
    cosine = unit @ unit.T
    inside, across = pair_means(cosine, labels)
    rng = np.random.default_rng(seed)
    shuffled = np.array([pair_means(cosine, rng.permutation(labels)) for _ in range(groupings)])
    upper = np.triu(np.ones_like(cosine, dtype=bool), k=1)
    same = (labels[:, None] == labels[None, :]) & upper
    return {
        "inside": inside,
        "across": across,
        "gap": inside - across,
        "random_inside": {"mean": float(shuffled[:, 0].mean()), "sd": float(shuffled[:, 0].std(ddof=1))},
        "random_gap": {
            "mean": float((shuffled[:, 0] - shuffled[:, 1]).mean()),
            "sd": float((shuffled[:, 0] - shuffled[:, 1]).std(ddof=1)),
        },
        "histogram": {
            "bins": BINS.tolist(),
            "inside": np.histogram(cosine[same], BINS)[0].tolist(),
            "across": np.histogram(cosine[upper & ~same], BINS)[0].tolist(),
        },
    }


def measure(
    model_path: Path, examples: Path, clusters: Path, source: Source | Path, image_root, settings, stats: StageStats
) -> dict:
    """The coherence figures (``settings``: the coherence stage's) at the checkpoint ``model_path``."""
    chosen = chosen_examples(
        usable_image_examples(examples), read_parquet(clusters), settings.gradients, settings.per_cluster, settings.seed
    )
    model, processor = load_checkpoint(model_path)
    device = compute_device()
    model.to(device).eval()
    encoder = ConversationEncoder.of_checkpoint(model_path, processor, image_root, device)
    sketch = GradientSketch(model, encoder, settings.dimensions, settings.seed)
    with as_source(source).reader(chosen) as records:
        positions = progress(range(len(chosen)), total=len(chosen), desc="gradients", unit="example")
        sketches = np.stack([sketch(records[i]) for i in positions])
    labels = chosen.cluster.to_numpy()
    result = coherence(sketches, labels, settings.groupings, settings.seed)
    result.update(
        checkpoint=str(model_path), examples=len(chosen), clusters=int(len(np.unique(labels))),
        dimensions=settings.dimensions, groupings=settings.groupings,
    )  # fmt: skip
    stats.add("in", len(chosen))
    stats.set("gap", result["gap"])
    stats.set("random_gap", result["random_gap"]["mean"])
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="the proxy checkpoint the gradients are taken at")
    add_input_arguments(parser, "examples", "annotations", "image_root")
    parser.add_argument("--clusters", required=True, type=Path, help="clusters.parquet from `xmas cluster`")
    parser.add_argument("--out", required=True, type=Path, help="coherence JSON to write")
    add_threads_argument(parser)
    add_settings(parser, "coherence")


def run(args: argparse.Namespace) -> None:
    use_threads(args.threads)
    stats = StageStats("coherence")
    settings = settings_of(args, "coherence")
    source = stage_source(args.annotations, settings)
    result = measure(args.model, args.examples, args.clusters, source, args.image_root, settings, stats)
    write_json(result, args.out)
    stats.finish(args.stats)
