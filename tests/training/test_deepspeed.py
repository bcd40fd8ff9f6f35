"""DeepSpeed ZeRO for real, on the CPU: two processes over gloo (DeepSpeed's CPU accelerator) fine-tune
the tiny target through `xmas finetune-target`, as `accelerate launch` starts it on a GPU node.

Skipped only where DeepSpeed is not installed and XMAS_REQUIRE_DEEPSPEED is unset; CI installs it (the
dev extra) and sets it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess

import pytest

from xmas.data.annotations import read_all
from xmas.io import write_records

from conftest import launched

pytestmark = pytest.mark.slow

# 70 records in global batches of 16: the last batch has 6, 3 per process, so 2 micro-batches of 2
# where DeepSpeed's gradient accumulation expects 4.
RECORDS, BATCH, MICRO = 70, 16, 2


@pytest.fixture(scope="module", autouse=True)
def deepspeed_installed():
    if importlib.util.find_spec("deepspeed") is None:
        if os.environ.get("XMAS_REQUIRE_DEEPSPEED"):
            pytest.fail('XMAS_REQUIRE_DEEPSPEED is set but DeepSpeed is not installed: pip install -e ".[dev]"')
        pytest.skip("DeepSpeed is not installed")


@pytest.fixture(scope="module")
def short_last_batch(small_demo, tmp_path_factory):
    path = tmp_path_factory.mktemp("deepspeed") / "subset.json"
    write_records(read_all(small_demo["train"])[:RECORDS], path)
    return path


def finetune(tiny_checkpoint, subset, small_demo, out, *options, processes=2):
    command = [
        *launched(processes),
        "finetune-target",
        "--base",
        str(tiny_checkpoint),
        "--subset",
        str(subset),
        "--image-root",
        str(small_demo["images"]),
        "--out",
        str(out),
        "--batch-size",
        str(BATCH),
        "--micro-batch-size",
        str(MICRO),
        "--epochs",
        "1",
        "--threads",
        "1",
        *options,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads((out / "xmas_finetune.json").read_text())["losses"], result.stderr


@pytest.fixture(scope="module")
def one_process(tiny_checkpoint, short_last_batch, small_demo, tmp_path_factory):
    losses, _ = finetune(
        tiny_checkpoint, short_last_batch, small_demo, tmp_path_factory.mktemp("torch") / "out", processes=1
    )
    return losses


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_short_last_batch_trains_and_saves_like_one_process(
    zero, tiny_checkpoint, short_last_batch, small_demo, one_process, tmp_path
):
    out = tmp_path / "out"
    losses, _ = finetune(tiny_checkpoint, short_last_batch, small_demo, out, "--deepspeed", zero)
    assert len(losses) == len(one_process) == -(-RECORDS // BATCH)
    assert losses == pytest.approx(one_process, rel=1e-5), (losses, one_process)
    assert (out / "model.safetensors").is_file() and (out / "xmas_encoding.json").is_file()


def test_zero3_loads_each_process_a_half_of_the_base_in_bf16(tiny_checkpoint, short_last_batch, small_demo, tmp_path):
    _, log = finetune(
        tiny_checkpoint, short_last_batch, small_demo, tmp_path / "out", "--deepspeed", "zero3", "--precision", "bf16"
    )
    shares = re.findall(r"base loaded in torch\.(\w+); this process holds (\d+)% of its \d+ parameters", log)
    assert len(shares) == 2, log[-3000:]  # one line per process
    for dtype, share in shares:
        assert dtype == "bfloat16" and 45 <= int(share) <= 55
