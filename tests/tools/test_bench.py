"""The benchmarks (tools/bench.py): extraction agrees with the eager reference on a small paper-like
shape; the prepare benchmark generates its file and times prepare."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from xmas.models.attention import CrossModalAttention, top_singular_values

from bench import (
    adjusted_rand_index,
    bench_batches,
    bench_shape,
    build_bench_model,
    eager_blocks,
    main,
    matched_share,
    max_relative_difference,
)


def test_extraction_agrees_with_eager_on_a_small_paper_like_shape():
    """576 image tokens from a 336-pixel CLIP tower with 14-pixel patches, StableLM-2's partial rotary and 32 heads."""
    args = argparse.Namespace(shape="paper", text_layers=2, vision_layers=2, examples=2, batch_size=2)
    _, shape = bench_shape(args, on_cuda=False)
    shape["text"].update(hidden_size=128, intermediate_size=128, vocab_size=512)
    shape["vision"].update(hidden_size=32, intermediate_size=32, num_attention_heads=2)
    shape["text_lengths"] = (64, 96)
    model = build_bench_model(shape, seed=0)
    assert model.config.image_seq_length == 576 and model.config.text_config.num_attention_heads == 32
    [batch] = bench_batches(model, shape, seed=0)
    with torch.no_grad():
        ours, _ = CrossModalAttention(model).blocks(batch)
        model.set_attn_implementation("eager")
        reference = eager_blocks(model, batch)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    assert max_relative_difference([ours], [reference]) <= 1e-5
    torch.testing.assert_close(top_singular_values(ours, 5), top_singular_values(reference, 5), rtol=1e-5, atol=1e-6)


def test_benchmark_prints_each_mode_and_the_ratio_line(capsys):
    assert main(["trajectory", "--shape", "tiny", "--examples", "4", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("shape tiny (llava): LM 4 layers") and "peak memory: peak RSS growth" in out[1]
    assert [line.split(":")[0] for line in out[2:5]] == [
        "(a) plain forward, sdpa",
        "(b) extraction",
        "(c) eager output_attentions=True",
    ]
    assert all(re.search(r"examples/s, peak memory \+\d+\.\d+ GiB$", line) for line in out[2:5])
    match = re.fullmatch(r"extraction_vs_eager=(\S+) overhead_vs_forward=(\S+) agree=(\S+)", out[-1])
    assert match and float(match[3]) <= 1e-5


def test_the_benchmark_generates_a_file_and_times_prepare(tmp_path, capsys):
    assert main(["prepare", "--records", "300", "--file", str(tmp_path / "b.json")]) == 0
    assert len(json.loads((tmp_path / "b.json").read_text())) == 300
    out = capsys.readouterr().out
    assert "prepare: 300 records in" in out and "peak memory" in out and "target: <= 60 s and <= 4 GB: met" in out


def test_dag_benchmark_times_the_paper_plan_without_torch(capsys):
    assert main(["dag", "--repeats", "1", "--max-seconds", "300"]) == 0
    first, verdict = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(
        r"dag: llava665k\.yaml -n results/eval/summary\.tsv results/report\.html: median [\d.]+ s, "
        r"best [\d.]+ s over 1 runs; torch imported: no",
        first,
    ), first
    assert verdict == "target: <= 300 s without torch: met"


def test_partition_agreement_measures():
    assert adjusted_rand_index([0, 0, 1, 1], [7, 7, 3, 3]) == 1.0 == matched_share([0, 0, 1, 1], [7, 7, 3, 3])
    assert abs(adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) + 0.5) < 1e-12  # worse than chance
    assert matched_share([0, 0, 0, 1], [1, 1, 2, 2]) == 0.75  # cluster 0 -> 1 (2 items), 1 -> 2 (1 item)
    assert matched_share([0, 0, 0, 0], [1, 1, 2, 2]) == 0.5  # one cluster matches one of the two


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "idefics3", "smolvlm"])
def test_the_benchmark_runs_each_family_on_its_processors_inputs_and_agrees_with_eager(family, capsys):
    assert main(["trajectory", "--family", family, "--examples", "4", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    first = re.match(r"shape tiny \((\w+)\): LM 4 layers, hidden 256, 8 heads; .* (\d+)-(\d+) image tokens", out[0])
    assert first and first[1] == family and int(first[2]) > 5
    match = re.fullmatch(r"extraction_vs_eager=(\S+) overhead_vs_forward=(\S+) agree=(\S+)", out[-1])
    assert match and float(match[3]) <= 1e-5


def test_the_scale_benchmark_times_each_stage_at_each_size_and_their_growth(capsys):
    """The paper config's stages on two small generated parquet sets (the benchmark's own sizes are 665k and
    3M records); its K = 1000 clusters need some records."""
    assert main(["scale", "--records", "1500", "3000"]) == 0
    out = capsys.readouterr().out.splitlines()
    for records in ("1,500", "3,000"):
        for stage in ("prepare", "merge", "cluster", "sample"):
            line = next(line for line in out if re.match(rf"\s*{records} {stage}\s", line))
            assert re.search(r"records/s peak\s+[\d.]+ GB \(its rule asks \d+ GB.*\): fits$", line), line
    assert "growth from 1,500 to 3,000 records (2.00x the records):" in out
    assert out[-1] == "target: every stage within its rule's memory, prepare within 4 GB: met"
