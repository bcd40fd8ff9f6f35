"""Rule trajectory: sharding, resumable part files, length grouping, the attention and loss signals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from xmas import extraction
from xmas.data.examples import shard_slice, usable_image_examples
from xmas.errors import XmasError
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages import trajectory
from xmas.stages.trajectory import extract_shard

SETTINGS = stage_defaults("trajectory", batch_size=8, chunk_size=16)


def test_shards_partition_the_usable_image_examples(small_examples):
    usable = usable_image_examples(small_examples)
    shards = [shard_slice(usable, s, 3) for s in range(3)]
    assert pd.concat(shards).uid.tolist() == usable.uid.tolist()
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(XmasError, match="--shard must be in 0..2"):
        shard_slice(usable, 3, 3)


def run_shard(tiny_checkpoint, small_demo, shard, out, stats=None, signal="attention", **changes):
    stats = stats or StageStats("t")
    extract_shard(
        tiny_checkpoint,
        1,
        shard,
        small_demo["train"],
        small_demo["images"],
        out,
        dataclasses.replace(SETTINGS, **changes),
        signal,
        stats,
    )
    return stats


@pytest.fixture(scope="module")
def shard(small_examples):
    return shard_slice(usable_image_examples(small_examples), 0, 4)


@pytest.fixture(scope="module")
def clean_run(tiny_checkpoint, small_demo, shard, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "shard-0.parquet"
    run_shard(tiny_checkpoint, small_demo, shard, out)
    return pq.read_table(out).to_pandas()


def test_shard_file_has_one_row_per_example(clean_run, shard):
    assert clean_run.uid.tolist() == shard.uid.tolist()
    assert (clean_run.checkpoint == 1).all()
    assert list(clean_run.columns) == ["uid", "checkpoint", "sv1", "sv2", "sv3", "sv4", "sv5"]
    assert (clean_run.sv1 > 0).all() and (clean_run.sv1 >= clean_run.sv2).all()


def crash_on_third_chunk(tiny_checkpoint, small_demo, shard, out, monkeypatch):
    """Run the shard until its third chunk, as a killed job would, leaving two part files."""
    real_extract, calls = trajectory.extract_chunk, []

    def extract_or_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_extract(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(trajectory, "extract_chunk", extract_or_crash)
        with pytest.raises(KeyboardInterrupt):
            run_shard(tiny_checkpoint, small_demo, shard, out)


def test_a_crashed_shard_resumes_without_recomputing_finished_rows(
    tiny_checkpoint, small_demo, shard, clean_run, tmp_path, monkeypatch
):
    out = tmp_path / "shard-0.parquet"
    crash_on_third_chunk(tiny_checkpoint, small_demo, shard, out, monkeypatch)
    assert not out.exists()
    assert sorted(p.name for p in out.with_name(out.name + ".parts").glob("part-*")) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    stats = run_shard(tiny_checkpoint, small_demo, shard, out)
    assert stats.counts["resumed_rows"] == 32
    assert stats.counts["computed_rows"] == len(shard) - 32
    pd.testing.assert_frame_equal(pq.read_table(out).to_pandas(), clean_run)
    assert not out.with_name(out.name + ".parts").exists()


def test_parts_from_other_settings_are_not_reused(tiny_checkpoint, small_demo, shard, tmp_path, monkeypatch):
    out = tmp_path / "shard-0.parquet"
    parts = out.with_name(out.name + ".parts")
    monkeypatch.setattr(trajectory, "extract_chunk", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_shard(tiny_checkpoint, small_demo, shard, out, top_k=3)
    (parts / "part-00000.parquet").write_bytes(b"stale")  # as if left by a run with top_k 3
    monkeypatch.undo()
    stats = run_shard(tiny_checkpoint, small_demo, shard, out)
    assert stats.counts["resumed_rows"] == 0 and stats.counts["computed_rows"] == len(shard)


def test_batches_grouped_by_length_restore_source_order():
    batches = extraction.batch_positions([5, 1, 4, 1, 3], 5, 2)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 2], [0]]
    values = extraction.run_batches(list(range(5)), batches, lambda rows: np.array([[r * 10.0] for r in rows]))
    assert values[:, 0].tolist() == [0, 10, 20, 30, 40]


def batches_run(tiny_checkpoint, small_demo, shard, out, monkeypatch, **changes) -> list[list[int]]:
    """The token lengths of every batch a run computes (the setting under test must shape them)."""
    real, seen = extraction.run_batches, []

    def recording(records, batches, compute):
        seen.extend(shard.set_index("uid").loc[[records[i]["id"] for i in b], "tokens"].tolist() for b in batches)
        return real(records, batches, compute)

    monkeypatch.setattr(extraction, "run_batches", recording)
    run_shard(tiny_checkpoint, small_demo, shard, out, **changes)
    monkeypatch.undo()
    return seen


def test_length_grouping_and_half_precision_keep_results(
    tiny_checkpoint, small_demo, shard, clean_run, tmp_path, monkeypatch
):
    out = tmp_path / "in-order.parquet"
    grouped = batches_run(tiny_checkpoint, small_demo, shard, tmp_path / "grouped.parquet", monkeypatch)
    in_order = batches_run(tiny_checkpoint, small_demo, shard, out, monkeypatch, group_by_length=False)
    assert SETTINGS.group_by_length  # the schema's default, which the clean run used
    assert all(batch == sorted(batch) for batch in grouped) and grouped != in_order  # the setting took effect
    padded = sum(len(b) * max(b) - sum(b) for b in grouped), sum(len(b) * max(b) - sum(b) for b in in_order)
    assert padded[0] < padded[1]
    ungrouped = pq.read_table(out).to_pandas()
    assert ungrouped.uid.tolist() == clean_run.uid.tolist()
    columns = [f"sv{k}" for k in range(1, 6)]
    np.testing.assert_allclose(ungrouped[columns].to_numpy(), clean_run[columns].to_numpy(), rtol=1e-4, atol=1e-6)
    run_shard(tiny_checkpoint, small_demo, shard, out, dtype="bfloat16")
    half = pq.read_table(out).to_pandas()
    np.testing.assert_allclose(half[columns].to_numpy(), clean_run[columns].to_numpy(), rtol=0.1, atol=1e-3)


def test_the_loss_signal_is_each_examples_own_training_loss(tiny_checkpoint, small_demo, shard, tmp_path):
    from xmas.data.annotations import SourceRecords
    from xmas.models.checkpoints import load_checkpoint
    from xmas.models.encoding import ConversationEncoder

    out = tmp_path / "loss.parquet"
    run_shard(tiny_checkpoint, small_demo, shard, out, signal="loss")
    losses = pq.read_table(out).to_pandas()
    assert list(losses.columns) == ["uid", "checkpoint", "loss"] and losses.uid.tolist() == shard.uid.tolist()
    model, processor = load_checkpoint(tiny_checkpoint)
    encoder = ConversationEncoder.of_checkpoint(tiny_checkpoint, processor, small_demo["images"])
    with SourceRecords(small_demo["train"], shard.iloc[:6]) as records, torch.no_grad():
        alone = [float(model(**encoder([record])).loss) for record in records]
    np.testing.assert_allclose(losses.loss.to_numpy()[:6], alone, rtol=1e-4)
    assert losses.loss.nunique() > 1


def test_the_loss_trajectories_cluster_on_their_single_column(tmp_path, small_examples):
    from xmas.stages.cluster import stability, trajectory_tensor

    usable = usable_image_examples(small_examples)
    uids = usable.uid.tolist()[:4]
    frame = pd.DataFrame(
        {
            "uid": uids * 3,
            "checkpoint": np.repeat([1, 2, 3], 4),
            "loss": [2.0, 2.0, 1.0, 3.0, 1.0, 2.0, 1.0, 1.0, 0.5, 2.0, 1.0, 2.0],
        }
    )
    tensor = trajectory_tensor(frame, uids)
    assert tensor.shape == (4, 3, 1)
    np.testing.assert_allclose(stability(tensor), [1.5, 0.0, 0.0, 3.0])


def cut_short(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize(
    "damage, resumed",
    [
        (lambda parts: cut_short(parts / "part-00001.parquet"), 16),
        (lambda parts: (parts / "part-00000.parquet").write_bytes(b""), 16),
        (lambda parts: cut_short(parts / "fingerprint.json"), 0),
    ],
    ids=["part-cut-short", "part-emptied", "fingerprint-cut-short"],
)
def test_damaged_parts_are_computed_again_not_reused(
    tiny_checkpoint, small_demo, shard, clean_run, tmp_path, monkeypatch, damage, resumed
):
    out = tmp_path / "shard-0.parquet"
    crash_on_third_chunk(tiny_checkpoint, small_demo, shard, out, monkeypatch)
    damage(out.with_name(out.name + ".parts"))
    stats = run_shard(tiny_checkpoint, small_demo, shard, out)
    assert stats.counts["resumed_rows"] == resumed
    pd.testing.assert_frame_equal(pq.read_table(out).to_pandas(), clean_run)


def test_the_upstream_definition_writes_its_own_values(tiny_checkpoint, small_demo, shard, clean_run, tmp_path):
    out = tmp_path / "upstream.parquet"
    run_shard(tiny_checkpoint, small_demo, shard, out, definition="upstream")
    upstream = pq.read_table(out).to_pandas()
    assert list(upstream.columns) == list(clean_run.columns) and upstream.uid.tolist() == clean_run.uid.tolist()
    assert (upstream.sv1 > 0).all() and not np.allclose(upstream.sv1, clean_run.sv1, rtol=1e-2)
    run_shard(tiny_checkpoint, small_demo, shard, tmp_path / "again.parquet", definition="upstream")
    assert (tmp_path / "again.parquet").read_bytes() == out.read_bytes()
