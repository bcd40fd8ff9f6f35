"""``xmas <stage>``: every workflow rule is one call of one of these stages."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import textwrap

from xmas import __version__
from xmas.errors import XmasError
from xmas.io import set_command
from xmas.progress import setup_logging

# One stage per workflow rule, named like it: `xmas train-segment` is rule train_segment, in
# xmas/stages/train_segment.py. Stage -> (one-line summary, example). Modules import lazily: torch is
# slow to load.
STAGES = {
    "demo-data": (
        "generate a dataset to run on: the demo's shape scenes, or a small LLaVA-665k-shaped set",
        "xmas demo-data --settings shapes --train-json results/demo/train.json "
        "--test-json results/demo/test.json --image-root results/demo/images",
    ),
    "download": (
        "download a real dataset (llava665k, visionflan): resumable, verified, unpacked",
        "xmas download --dataset llava665k --dest resources/llava665k --report resources/llava665k/download.json",
    ),
    "standin-model": (
        "write an offline stand-in of a real model (tiny random weights, the real files' layout)",
        "xmas standin-model --name vicuna-7b-v1.5 --out results/standins/vicuna-7b-v1.5",
    ),
    "proxy-init": (
        "build the proxy's checkpoint 0 from a preset, a model folder or a Hugging Face id",
        "xmas proxy-init --model demo-tiny --annotations results/demo/train.json --out results/proxy/checkpoint-0",
    ),
    "prepare": (
        "validate the records (JSON, parquet shards, a save_to_disk folder) against the proxy, "
        "write results/data/examples.parquet",
        "xmas prepare --annotations data/llava.json --image-root data/images "
        "--model results/proxy/checkpoint-0 --out results/data/examples.parquet",
    ),
    "train-segment": (
        "train the proxy from checkpoint c-1 to checkpoint c",
        "xmas train-segment --checkpoint 1 --checkpoints 5 --previous results/proxy/checkpoint-0 "
        "--out results/proxy/checkpoint-1 --examples results/data/examples.parquet "
        "--annotations results/demo/train.json --image-root results/demo/images",
    ),
    "trajectory": (
        "top-k singular values of text-to-image attention, one shard of one checkpoint",
        "xmas trajectory --model results/proxy/checkpoint-1 --checkpoint 1 --shard 0 --shards 2 "
        "--examples results/data/examples.parquet --annotations results/demo/train.json "
        "--image-root results/demo/images --out results/trajectories/checkpoint-1/shard-0.parquet",
    ),
    "merge": (
        "merge the shards into results/trajectories.parquet, checking completeness",
        "xmas merge --examples results/data/examples.parquet --checkpoints 5 --shards 2 "
        "--out results/trajectories.parquet results/trajectories/checkpoint-*/shard-*.parquet",
    ),
    "cluster": (
        "stability and k-means clusters of the trajectories",
        "xmas cluster --examples results/data/examples.parquet --trajectories results/trajectories.parquet "
        "--out results/selection/clusters.parquet",
    ),
    "features": (
        "a reference VLM's features of one shard of the image records (COINCIDE's and SemDeDup's)",
        "xmas features --model results/proxy/checkpoint-5 --shard 0 --shards 2 "
        "--examples results/data/examples.parquet --annotations results/demo/train.json "
        "--image-root results/demo/images --out results/features/shard-0.parquet",
    ),
    "cluster-features": (
        "spherical k-means of the features, for COINCIDE or SemDeDup",
        "xmas cluster-features --method coincide --examples results/data/examples.parquet "
        "--out results/coincide/selection/clusters.parquet --centroids results/coincide/selection/centroids.parquet "
        "results/features/shard-*.parquet",
    ),
    "sample": (
        "pick a subset for a budget (xmas balanced sampling or a baseline), written in the source's format",
        "xmas sample --method xmas --budget 0.5 --examples results/data/examples.parquet "
        "--clusters results/selection/clusters.parquet --annotations results/demo/train.json "
        "--out results/xmas/seed-0/subset_0.5.json",
    ),
    "coherence": (
        "does XMAS's premise hold here: gradients' similarity inside and across the clusters, against chance",
        "xmas coherence --model results/proxy/checkpoint-5 --examples results/data/examples.parquet "
        "--annotations results/demo/train.json --image-root results/demo/images "
        "--clusters results/selection/clusters.parquet --out results/selection/coherence.json",
    ),
    "llamafactory": (
        "write the subsets as LLaMA-Factory datasets (ShareGPT data files and their dataset_info.json)",
        "xmas llamafactory --subset xmas_0.5 results/xmas/seed-0/subset_0.5.json --image-root data/images "
        "--out results/llamafactory",
    ),
    "target-init": (
        "build the target's checkpoint 0 from a preset, a model folder or a Hugging Face id",
        "xmas target-init --model demo-target --annotations results/demo/train.json --out results/target/base",
    ),
    "pretrain-target": (
        "align the target on image-caption pairs (LLaVA's first stage), once, before every fine-tune",
        "xmas pretrain-target --base results/target/base --captions results/demo/captions.json "
        "--image-root results/demo/images --out results/target/aligned",
    ),
    "finetune-target": (
        "fine-tune the target model on a subset (LoRA or all weights)",
        "xmas finetune-target --base results/target/base --subset results/xmas/seed-0/subset_0.5.json "
        "--image-root results/demo/images --out results/target/xmas/0.5/seed-0",
    ),
    "evaluate": (
        "score a fine-tuned target: a held-out split by exact match, or the paper's benchmarks (lmms-eval)",
        "xmas evaluate --model results/target/xmas/0.5/seed-0 --suite exact-match "
        "--test results/demo/test.json --image-root results/demo/images "
        "--out results/eval/runs/xmas/0.5/seed-0.tsv",
    ),
    "summarize": (
        "collect the evaluation runs into results/eval/summary.tsv with ARP",
        "xmas summarize --run xmas 0.5 0 results/eval/runs/xmas/0.5/seed-0.tsv "
        "--run full 1 0 results/eval/runs/full/1/seed-0.tsv --out results/eval/summary.tsv",
    ),
    "report": (
        "write the HTML report: trajectories, clusters, stability, composition, settings",
        "xmas report --examples results/data/examples.parquet --annotations results/demo/train.json "
        "--clusters results/selection/clusters.parquet --trajectories results/trajectories.parquet "
        "--manifest xmas 0.5 results/xmas/seed-0/subset_0.5.manifest.parquet --out results/report.html",
    ),
}


def stage_module(name: str) -> str:
    return f"xmas.stages.{name.replace('-', '_')}"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="xmas",
        description="XMAS data selection for vision-language instruction tuning. Each stage is one step of the "
        "Snakemake workflow; run `snakemake results/subset_0.5.json` for the whole pipeline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `xmas <stage> --help` for a stage's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"xmas {__version__}")
    subparsers = parser.add_subparsers(dest="stage", metavar="<stage>")
    stage_parsers = {}
    for name, (summary, example) in STAGES.items():
        stage_parsers[name] = subparsers.add_parser(
            name,
            help=summary,
            description=summary[0].upper() + summary[1:] + ".",
            epilog="example:\n" + textwrap.indent(textwrap.fill(example, 100, subsequent_indent="    "), "  "),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        stage_parsers[name].add_argument("--stats", help="write the stage's counts (in, out, excluded) as JSON here")
        stage_parsers[name].add_argument("--verbose", action="store_true", help="debug logging")
    return parser, stage_parsers


def main(argv: list[str] | None = None) -> int:
    if not sys.stderr.isatty():  # log files (Snakemake, Slurm) get no carriage-return progress bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser, stage_parsers = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv and argv[0] in STAGES else None
    if name is not None:
        module = importlib.import_module(stage_module(name))
        module.add_arguments(stage_parsers[name])
    args = parser.parse_args(argv)
    if args.stage is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    set_command(["xmas", *argv])
    try:
        module.run(args)
    except XmasError as error:
        logging.getLogger("xmas").error("%s failed: %s", args.stage, error)
        return 1
    finally:
        set_command([])  # files written later in this process (tests, notebooks) were not made by it
    return 0
