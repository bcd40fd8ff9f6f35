"""Rule merge: the shard files joined, and a missing example named with its checkpoint and shard."""

from __future__ import annotations

import pytest

from xmas.data.examples import shard_slice, usable_image_examples
from xmas.errors import XmasError
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages.merge import merge
from xmas.stages.trajectory import extract_shard

SETTINGS = stage_defaults("trajectory", batch_size=8, chunk_size=16)


def test_merge_names_missing_examples_and_their_shards(tiny_checkpoint, small_demo, small_examples, tmp_path):
    usable = usable_image_examples(small_examples)
    files = []
    for s in range(2):
        files.append(tmp_path / f"shard-{s}.parquet")
        extract_shard(
            tiny_checkpoint,
            1,
            shard_slice(usable, s, 2),
            small_demo["train"],
            small_demo["images"],
            files[-1],
            SETTINGS,
            "attention",
            StageStats("t"),
        )
    merged = merge(files, small_examples, 1, 2, StageStats("t")).to_pandas()
    assert merged.uid.tolist() == usable.uid.tolist()
    with pytest.raises(XmasError) as caught:
        merge(files[:1], small_examples, 1, 2, StageStats("t"))
    message = str(caught.value)
    assert "checkpoint 1" in message and "shards [1]" in message and shard_slice(usable, 1, 2).uid.iloc[0] in message
    with pytest.raises(XmasError, match="checkpoint 2: .* missing"):
        merge(files, small_examples, 2, 2, StageStats("t"))
