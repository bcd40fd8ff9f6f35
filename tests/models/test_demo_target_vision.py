"""The demo target can see: its frozen, random vision tower keeps each object's colour, shape and side
in the features of the patch that holds it, which is all its projector and language model can learn
to read (docs/evaluation.md measures the fine-tuned target)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmas.data.demo import Grid, random_scene, render
from xmas.models.presets import TARGET_PRESETS, chat_template, load_presets, materialise, resolve

from conftest import small_generator_settings

ATTRIBUTES = ("color", "kind", "side")


def patch_features(preset: dict, grid: Grid, scenes: int = 400) -> tuple[torch.Tensor, dict[str, list[str]]]:
    """The vision tower's output (what the projector reads) at each object's patch, with the object's attributes."""
    model, processor = materialise(preset, seed=0, template=chat_template("demo"), texts=["what is in the image"])
    rng = np.random.default_rng(0)
    features, labels = [], {name: [] for name in ATTRIBUTES}
    for _ in range(scenes):
        scene = random_scene(rng, grid, int(rng.integers(1, 4)))
        pixels = processor.image_processor(render(scene, grid.size, rng), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            patches = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][0, 1:]
        for obj in scene:
            features.append(patches[grid.cell_of(obj)])
            for name in ATTRIBUTES:
                labels[name].append(getattr(obj, name))
    return torch.stack(features), labels


def probe_accuracy(features: torch.Tensor, labels: list[str], train_share: float = 0.7) -> float:
    """Held-out accuracy of a ridge-regression linear probe onto one-hot labels."""
    classes = sorted(set(labels))
    targets = torch.nn.functional.one_hot(torch.tensor([classes.index(label) for label in labels])).float()
    cut = int(train_share * len(labels))
    mean, std = features[:cut].mean(0), features[:cut].std(0) + 1e-6
    inputs = torch.cat([(features - mean) / std, torch.ones(len(features), 1)], dim=1)
    gram = inputs[:cut].T @ inputs[:cut] + 1e-1 * torch.eye(inputs.shape[1])
    weights = torch.linalg.solve(gram, inputs[:cut].T @ targets[:cut])
    return ((inputs[cut:] @ weights).argmax(1) == targets[cut:].argmax(1)).float().mean().item()


def nearest_mean_accuracy(features: torch.Tensor, labels: list[str], train_share: float = 0.7) -> float:
    """Held-out accuracy of the nearest class mean, unscaled: how far apart the classes lie, not merely
    whether some direction separates them."""
    classes = sorted(set(labels))
    codes, cut = torch.tensor([classes.index(label) for label in labels]), int(train_share * len(labels))
    means = torch.stack([features[:cut][codes[:cut] == code].mean(0) for code in range(len(classes))])
    return (torch.cdist(features[cut:], means).argmin(1) == codes[cut:]).float().mean().item()


@pytest.fixture(scope="module")
def grid() -> Grid:
    return Grid.of(small_generator_settings())


@pytest.fixture(scope="module")
def preset() -> dict:
    return resolve("demo-target", load_presets(TARGET_PRESETS))


def test_each_patch_tells_its_objects_colour_shape_and_side(grid, preset):
    assert preset["patch_size"] == grid.cell  # one patch sees one object whole
    features, labels = patch_features(preset, grid)
    accuracy = {name: probe_accuracy(features, labels[name]) for name in ATTRIBUTES}
    assert accuracy["color"] > 0.95 and accuracy["kind"] > 0.9 and accuracy["side"] > 0.95, accuracy
    assert nearest_mean_accuracy(features, labels["side"]) > 0.95


def test_with_clips_own_position_embeddings_a_patchs_side_is_faint(grid, preset):
    features, labels = patch_features({**preset, "position_embedding_std": None}, grid)
    assert nearest_mean_accuracy(features, labels["side"]) < 0.6  # 0.5 is chance
