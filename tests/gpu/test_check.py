"""The GPU check (tests/gpu/check.sh) in its CPU smoke mode: the same code at tiny sizes prints every
figure and passes."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from bench import main as bench_main
from conftest import REPO


def figures(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


def test_the_smoke_run_prints_each_check_and_passes(tmp_path):
    result = subprocess.run(
        ["bash", "tests/gpu/check.sh", "--cpu-smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable, "XMAS_CHECK_LOGS": str(tmp_path)},
        timeout=300,
    )
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-2000:]
    assert re.search(r"^torch \S+ \(CUDA \S+\), transformers \S+, peft \S+, accelerate \S+$", out, re.MULTILINE)
    assert "GPU: none (CPU smoke run" in out
    summary = out[out.index("== summary") :].splitlines()
    assert [line.split()[:3] for line in summary[1:5]] == [
        ["RESULT", "trajectory-bench", "PASS"],
        ["RESULT", "proxy-step", "PASS"],
        ["RESULT", "lora-7b-step", "PASS"],
        ["RESULT", "proxy-step-fsdp", "SKIP"],  # accelerate has no FSDP on CPUs; train_step.py --fsdp on a GPU
    ]
    assert summary[-1] == "check: PASS"
    assert (tmp_path / "summary.txt").read_text().splitlines() == summary[1:5]
    assert sorted(path.name for path in tmp_path.glob("*.log")) == [
        "lora-7b-step.log",
        "proxy-step.log",
        "trajectory-bench.log",
    ]
    bench = figures(summary[1])
    assert float(bench["agree"]) <= float(bench["max_disagreement"]) == 0.05
    assert float(bench["extraction_vs_eager"]) > 0 and float(bench["extract_examples_per_s"]) > 0
    assert "(b) extraction: 4 examples" in out and "weights bfloat16 (eager reference float32)" in out
    for line in summary[2:4]:
        step = figures(line)
        assert float(step["step_s"]) > 0 and float(step["peak_gib"]) > 0
        assert abs(float(step["loss"]) - math.log(256)) < 0.5, "a random model's loss is about ln(vocabulary)"
        assert int(step["examples"]) == 4 and int(step["tokens"]) > 4 * 16
    assert "lora-7b-step: step 2: " in out and "LoRA r=8 alpha=16" in out and "gradient checkpointing on" in out
    assert "q_proj.base_layer.weight (frozen)" in out and "lora_B.default.weight (trains)" in out


def test_the_bench_fails_when_the_agreement_is_not_met(capsys):
    assert (
        bench_main(
            [
                "trajectory",
                "--shape",
                "tiny",
                "--examples",
                "2",
                "--batch-size",
                "2",
                "--dtype",
                "bfloat16",
                "--build-on-device",
                "--max-disagreement",
                "1e-12",
            ]
        )
        == 1
    )
    assert re.search(r"^agreement: \S+ <= 1\.00e-12: NOT met$", capsys.readouterr().out, re.MULTILINE)
