"""Sealed outputs: what a stage wrote is verified before it is trusted, and a full disk names the file.

The full disk is a real one: a 1 MiB tmpfs, filled. Mounting needs root; CI runs as root and sets
XMAS_REQUIRE_MOUNT, elsewhere those tests are skipped without it.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pandas as pd
import pytest
import torch

from xmas.cli import main
from xmas.errors import XmasError
from xmas.io import (
    DamagedOutput,
    atomic_path,
    damaged_outputs,
    read_json,
    read_parquet,
    seal_path,
    set_aside,
    verify,
    write_json,
    write_parquet,
)


def test_a_sealed_file_is_verified_by_size_and_checksum(tmp_path):
    path = tmp_path / "table.parquet"
    write_parquet(pd.DataFrame({"uid": ["a", "b"], "value": [1.0, 2.0]}), path)
    assert verify(path) == path and read_parquet(path).uid.tolist() == ["a", "b"]
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes: only the checksum tells
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedOutput, match=rf"{path} does not hold what was written \(its SHA-256 differs\)"):
        read_parquet(path)
    assert damaged_outputs(tmp_path) == []  # the quick scan compares sizes only
    path.write_bytes(bytes(data[:10]))
    assert [damage.path for damage in damaged_outputs(tmp_path)] == [path]


def test_an_unsealed_file_that_cannot_be_read_is_named(tmp_path):
    path = tmp_path / "fingerprint.json"
    path.write_text('{"model": "chec')
    with pytest.raises(DamagedOutput, match=rf"{path} is damaged: it cannot be read as JSON \(JSONDecodeError"):
        read_json(path)


def test_damaged_outputs_are_set_aside_and_whole_ones_kept(tmp_path):
    whole, cut = tmp_path / "whole.json", tmp_path / "sub" / "cut.json"
    write_json({"n": 1}, whole)
    write_json({"n": list(range(100))}, cut)
    written = cut.stat().st_size
    cut.write_text(cut.read_text()[:50])
    damaged = damaged_outputs(tmp_path)
    assert [damage.path for damage in damaged] == [cut]  # found, read only
    assert cut.exists() and seal_path(cut).exists()
    assert set_aside(damaged) == [f"{cut} holds 50 bytes, {written} were written: set aside as {cut}.damaged"]
    assert not cut.exists() and not seal_path(cut).exists() and (tmp_path / "sub/cut.json.damaged").exists()
    assert read_json(whole) == {"n": 1} and damaged_outputs(tmp_path) == []


def try_mount(folder) -> str | None:
    folder.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    return None if result.returncode == 0 else (result.stderr.strip() or f"mount exited {result.returncode}")


@pytest.fixture
def full_disk(tmp_path):
    """A mounted 1 MiB file system, filled to the last byte by ``filler``."""
    folder = tmp_path / "full"
    why = try_mount(folder) if os.geteuid() == 0 else "not root"
    if why is not None:
        if os.environ.get("XMAS_REQUIRE_MOUNT"):
            pytest.fail(f"XMAS_REQUIRE_MOUNT is set but a tmpfs cannot be mounted: {why}")
        pytest.skip(f"a tmpfs cannot be mounted here ({why}); CI sets XMAS_REQUIRE_MOUNT")
    filler = folder / "filler"
    try:
        with open(filler, "wb") as out:
            while True:
                out.write(b"\0" * 4096)
                out.flush()
    except OSError as error:
        assert error.errno == errno.ENOSPC
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_under_torch_save_names_the_file_and_leaves_nothing(full_disk):
    target = full_disk / "checkpoint-1" / "training_state.pt"
    target.parent.mkdir()
    with pytest.raises(
        XmasError,
        match=rf"no space left on the device while writing {target} .*nothing was "
        "half-written; free some space and run again",
    ) as raised:
        with atomic_path(target) as tmp:
            torch.save({"weights": torch.zeros(100_000)}, tmp)  # torch reports it as "[enforce fail ...]"
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert sorted(path.name for path in target.parent.iterdir()) == []


def test_a_stage_on_a_full_disk_fails_naming_the_file_then_completes_once_there_is_room(
    full_disk, tiny_checkpoint, small_demo, small_examples, tmp_path, capfd
):
    def trajectory(out):
        return main(
            [
                "trajectory",
                "--model",
                str(tiny_checkpoint),
                "--checkpoint",
                "1",
                "--shard",
                "0",
                "--shards",
                "4",
                "--examples",
                str(small_examples),
                "--annotations",
                str(small_demo["train"]),
                "--image-root",
                str(small_demo["images"]),
                "--out",
                str(out),
                "--threads",
                "1",
            ]
        )

    out = full_disk / "shard-0.parquet"
    assert trajectory(out) == 1
    assert f"no space left on the device while writing {full_disk}/shard-0.parquet.parts/" in capfd.readouterr().err
    assert not out.exists()
    (full_disk / "filler").unlink()
    assert trajectory(out) == 0
    assert trajectory(tmp_path / "roomy.parquet") == 0
    assert out.read_bytes() == (tmp_path / "roomy.parquet").read_bytes()
