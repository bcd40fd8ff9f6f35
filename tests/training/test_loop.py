"""The training loop: every rank and micro-batch of a global step, one process or several."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages.train_segment import train_segment
from xmas.training import loop
from xmas.training.engine import free_port
from xmas.training.launch import launcher_prefix
from xmas.training.loop import DataOrder, make_optimizer, rank_micro_batches

from conftest import launched, workflow_environment

SETTINGS = stage_defaults("train-segment", epochs=1, batch_size=24, checkpoints=3, learning_rate=2e-3, warmup_ratio=0.1)


@pytest.mark.parametrize(
    ("schedule", "halfway", "end"), [("cosine", 0.5, 0.0), ("linear", 0.5, 0.0), ("constant", 1.0, 1.0)]
)
def test_the_learning_rate_follows_the_schedule_after_the_warmup(schedule, halfway, end):
    settings = dataclasses.replace(SETTINGS, learning_rate=1.0, warmup_ratio=0.0, lr_schedule=schedule)
    optimizer, scheduler = make_optimizer(torch.nn.Linear(2, 2), settings, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == 1.0 and rates[5] == pytest.approx(halfway) and scheduler.get_last_lr()[0] == pytest.approx(end)


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(records=100, batch_size=32, seed=0)
    for epoch in range(2):
        seen = np.concatenate([order.indices(step) for step in range(4 * epoch, 4 * epoch + 4)])
        assert sorted(seen) == list(range(100))  # every record once per epoch
    assert not np.array_equal(order.indices(0), order.indices(4))  # reshuffled per epoch


def test_rank_shares_cover_the_batch_with_equal_call_counts():
    indices = np.arange(10, 23)  # 13 examples over 4 ranks in micro-batches of 2
    shares = [rank_micro_batches(indices, rank, 4, 2) for rank in range(4)]
    assert {len(share) for share in shares} == {2}  # every rank makes the same number of calls
    assert sorted(np.concatenate([m for share in shares for m in share]).tolist()) == indices.tolist()
    small = [rank_micro_batches(np.arange(3), rank, 4, None) for rank in range(4)]
    assert [len(share[0]) for share in small] == [1, 1, 1, 0]  # the last rank runs a weight-0 filler


def single_process(previous, out, small_demo, small_examples, **overrides):
    train_segment(
        previous,
        out,
        1,
        dataclasses.replace(SETTINGS, **overrides),
        small_examples,
        small_demo["train"],
        small_demo["images"],
        StageStats("t"),
    )
    return load_file(out / "model.safetensors")


def forward_sizes(monkeypatch) -> list[int]:
    """The number of records of every forward/backward the training runs from here on."""
    real, sizes = loop.encode_share, []

    def recording(encoder, share, with_an_image):
        sizes.append(len(share))
        return real(encoder, share, with_an_image)

    monkeypatch.setattr(loop, "encode_share", recording)
    return sizes


def test_micro_batches_give_the_same_step_as_whole_batches(
    tiny_checkpoint, small_demo, small_examples, tmp_path, monkeypatch
):
    sizes = forward_sizes(monkeypatch)
    whole = single_process(tiny_checkpoint, tmp_path / "whole", small_demo, small_examples)
    assert sizes and set(sizes) == {24}  # the whole global batch at once
    sizes.clear()
    accumulated = single_process(tiny_checkpoint, tmp_path / "micro", small_demo, small_examples, micro_batch_size=7)
    assert sizes and set(sizes) == {6}  # the setting took effect: 24 records in 4 micro-batches of at most 7
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-5, msg=name)


def segment_options(tiny_checkpoint, small_demo, small_examples, out: Path, stats: Path) -> list[str]:
    return [
        "train-segment",
        "--checkpoint",
        "1",
        "--checkpoints",
        "3",
        "--previous",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--examples",
        str(small_examples),
        "--annotations",
        str(small_demo["train"]),
        "--image-root",
        str(small_demo["images"]),
        "--epochs",
        "1",
        "--batch-size",
        "24",
        "--learning-rate",
        "2e-3",
        "--warmup-ratio",
        "0.1",
        "--no-freeze-vision-tower",
        "--threads",
        "1",
        "--stats",
        str(stats),
    ]


def test_two_processes_with_gloo_match_one_process(tiny_checkpoint, small_demo, small_examples, tmp_path):
    """`accelerate launch` of 2 CPU processes (DDP over gloo), each on its half of every batch, equals one process."""
    out = tmp_path / "ddp"
    stage = segment_options(tiny_checkpoint, small_demo, small_examples, out, tmp_path / "s.json")
    command = [*launched(2), *stage]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "s.json").read_text())["processes"] == 2
    together = single_process(tiny_checkpoint, tmp_path / "one", small_demo, small_examples)
    distributed = load_file(out / "model.safetensors")
    assert distributed.keys() == together.keys()
    for name in together:
        torch.testing.assert_close(distributed[name], together[name], rtol=1e-4, atol=1e-5, msg=name)
    assert json.loads((out / "training_log.json").read_text())["losses"] == pytest.approx(
        json.loads((tmp_path / "one" / "training_log.json").read_text())["losses"], rel=1e-5
    )


def wait_for_listener(port, process, timeout):
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"the first node never listened on port {port} (exit {process.poll()})")


def test_two_nodes_meeting_at_the_first_match_one_process(tiny_checkpoint, small_demo, small_examples, tmp_path):
    """The command of a job of several nodes (xmas.training.launch), as srun starts it on each node, here twice on
    this machine: each launcher with its node's rank, the job's node list (this machine) and id (its port), one
    process each, meeting at the first node; together they train as one process does."""
    out, stats = tmp_path / "nodes", tmp_path / "s.json"
    prefix = launcher_prefix(1, "fp32", nodes=2)
    srun, (shell, flag, per_node, name) = prefix[:3], prefix[3:]
    assert srun[0] == "srun" and (shell, flag) == ("bash", "-c")
    port = next(port for port in iter(free_port, None) if 29500 <= port < 49500)
    stage = segment_options(tiny_checkpoint, small_demo, small_examples, out, stats)
    logs = [tmp_path / f"node-{rank}.log" for rank in range(2)]

    def start(rank):
        return subprocess.Popen(
            [shell, flag, per_node.strip("'"), name, *stage],
            stderr=logs[rank].open("w"),
            env=workflow_environment(
                OMP_NUM_THREADS="1",
                SLURM_NODEID=str(rank),
                SLURM_JOB_NODELIST="localhost",
                SLURM_JOB_ID=str(port - 29500),
                # Each "node" is this machine, known by loopback whether or not its hostname resolves.
                PET_LOCAL_ADDR="127.0.0.1",
                GLOO_SOCKET_IFNAME="lo",
            ),
        )

    # On a cluster only the first node can host the rendezvous at its own address; here both are "localhost", so
    # the second starts once the first holds the port (else it may host it first, and the first refuses the port).
    nodes = [start(0)]
    try:
        wait_for_listener(port, nodes[0], timeout=120)
        nodes.append(start(1))
        for node in nodes:
            node.wait(timeout=300)
    except subprocess.TimeoutExpired as timeout:
        raise AssertionError("".join(log.read_text()[-3000:] for log in logs)) from timeout
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "".join(log.read_text()[-3000:] for log in logs)
    assert json.loads(stats.read_text())["processes"] == 2
    together = single_process(tiny_checkpoint, tmp_path / "one", small_demo, small_examples)
    apart = load_file(out / "model.safetensors")
    for name in together:
        torch.testing.assert_close(apart[name], together[name], rtol=1e-4, atol=1e-5, msg=name)
