"""Rule features: a reference VLM's features as an independent unbatched computation gives them, in
resumable shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xmas.data.annotations import SourceRecords
from xmas.data.examples import shard_slice, usable_image_examples
from xmas.data.records import image_paths
from xmas.io import read_table
from xmas.models.checkpoints import load_checkpoint
from xmas.models.encoding import ConversationEncoder
from xmas.progress import StageStats
from xmas.selection.vectors import feature_matrix
from xmas.stages.features import ReferenceFeatures, extract_features

from conftest import MODERN_FAMILIES, feature_settings

SETTINGS = feature_settings()
LAYERS = SETTINGS.layers


def unbatched_features(model, encoder, record: dict) -> np.ndarray:
    """COINCIDE's and SemDeDup's features of one record, read as their code computes them: o_proj's inputs
    hooked, the image tokens and the tokens after the image averaged, tanh, normalised, over sqrt(2L); the
    last token's final hidden state."""
    batch = encoder([record], with_labels=False)
    inputs = {}
    layers = model.model.language_model.layers
    hooks = [
        layers[n].self_attn.o_proj.register_forward_hook(lambda m, a, o, n=n: inputs.update({n: a[0][0]}))
        for n in LAYERS
    ]
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state[0]
    for hook in hooks:
        hook.remove()
    ids = batch["input_ids"][0].numpy()
    image = np.flatnonzero(ids == model.config.image_token_id)
    parts = []
    for n in LAYERS:
        values = inputs[n].double().numpy()
        for rows in (image, np.arange(image.max() + 1, len(ids))):
            mean = np.tanh(values[rows].mean(axis=0))
            parts.append(mean / np.linalg.norm(mean))
    last = hidden[-1].double().numpy()
    return np.concatenate([np.concatenate(parts) / np.sqrt(len(parts)), last / np.linalg.norm(last)])


def test_features_of_a_padded_batch_are_each_records_own(tiny_checkpoint, small_demo, small_examples):
    model, processor = load_checkpoint(tiny_checkpoint)
    model.eval()
    encoder = ConversationEncoder.of_checkpoint(tiny_checkpoint, processor, small_demo["images"])
    usable = usable_image_examples(small_examples)
    picked = usable.iloc[np.argsort(usable.tokens.to_numpy())[[0, len(usable) // 2, -1]]]  # unequal lengths: padding
    assert picked.tokens.nunique() == 3
    records = SourceRecords(small_demo["train"], picked)[:]
    batched = ReferenceFeatures(model, encoder, LAYERS)(records)
    expected = np.stack([unbatched_features(model, encoder, record) for record in records])
    np.testing.assert_allclose(batched, expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(batched[:, : -model.config.text_config.hidden_size], axis=1), 1.0)


def test_a_killed_feature_job_resumes_from_its_parts(
    tiny_checkpoint, small_demo, small_examples, feature_shards, tmp_path, monkeypatch
):
    shard = shard_slice(usable_image_examples(small_examples), 0, 2)
    out = tmp_path / "shard-0.parquet"
    calls = []
    original = ReferenceFeatures.__call__

    def dies_in_the_second_chunk(self, records):  # 16 records a chunk: 4 batches of up to 5
        calls.append(len(records))
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, records)

    monkeypatch.setattr(ReferenceFeatures, "__call__", dies_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        extract_features(
            tiny_checkpoint, shard, small_demo["train"], small_demo["images"], out, SETTINGS, StageStats("t")
        )
    monkeypatch.setattr(ReferenceFeatures, "__call__", original)
    stats = StageStats("t")
    extract_features(tiny_checkpoint, shard, small_demo["train"], small_demo["images"], out, SETTINGS, stats)
    assert stats.counts["resumed_rows"] == 16 and stats.counts["computed_rows"] == len(shard) - 16
    resumed, clean = read_table(out), read_table(feature_shards[0])
    assert resumed.column("uid").to_pylist() == shard.uid.tolist() == clean.column("uid").to_pylist()
    np.testing.assert_array_equal(feature_matrix(resumed, "coincide"), feature_matrix(clean, "coincide"))


@pytest.mark.parametrize("family", sorted(MODERN_FAMILIES))
def test_every_family_gives_its_features_as_one_record_alone_does(family, modern_checkpoints, varied_data):
    """Today's families lay out image tokens their own way (Qwen's per-image counts, SmolVLM's tiles):
    the pooled features of a padded batch are each record's own."""
    checkpoint = modern_checkpoints[family]
    model, processor = load_checkpoint(checkpoint)
    model.eval()
    encoder = ConversationEncoder.of_checkpoint(checkpoint, processor, varied_data["images"])
    records = [record for record in json.loads(varied_data["train"].read_text()) if image_paths(record)][:3]
    layers = [0, model.config.get_text_config().num_hidden_layers - 1]
    features = ReferenceFeatures(model, encoder, layers)
    batched = features(records)
    alone = np.concatenate([features([record]) for record in records])
    np.testing.assert_allclose(batched, alone, atol=2e-5)
    hidden = model.config.get_text_config().hidden_size
    assert np.allclose(np.linalg.norm(batched[:, :-hidden], axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(batched[:, -hidden:], axis=1), 1.0, atol=1e-5)
