"""``xmas <stage>``: every workflow rule is one call of one of these stages."""

from __future__ import annotations

import argparse
import logging
import os
import importlib
import sys
import textwrap

from xmas import __version__
from xmas.errors import XmasError
from xmas.stage import setup_logging

# stage name -> (module, one-line summary, example). Modules import lazily: torch is slow to load.
STAGES = {
    "demo-data": ("xmas.demo", "generate the embedded demo dataset",
                  "xmas demo-data --settings resources/demo/generator.yaml --train-json results/demo/train.json "
                  "--test-json results/demo/test.json --image-root results/demo/images"),
    "download": ("xmas.download", "download a real dataset (llava665k, visionflan): resumable, verified, unpacked",
                 "xmas download --dataset llava665k --dest data/llava665k --report data/llava665k/download.json"),
    "standin": ("xmas.standins", "write an offline stand-in of a real model (tiny random weights, real file layout)",
                "xmas standin --name vicuna-7b-v1.5 --out results/standins/vicuna-7b-v1.5"),
    "proxy-init": ("xmas.proxy", "build a model's checkpoint 0 (proxy or target) from a preset or a model path",
                   "xmas proxy-init --model demo-tiny --annotations results/demo/train.json "
                   "--out results/proxy/checkpoint-0"),
    "prepare": ("xmas.prepare", "validate the annotations against the proxy, write results/data/examples.parquet",
                "xmas prepare --annotations data/llava.json --image-root data/images --model results/proxy/checkpoint-0 "
                "--out results/data/examples.parquet"),
    "train-segment": ("xmas.train", "train the proxy from checkpoint c-1 to checkpoint c",
                      "xmas train-segment --checkpoint 1 --checkpoints 5 --previous results/proxy/checkpoint-0 "
                      "--out results/proxy/checkpoint-1 --examples results/data/examples.parquet "
                      "--annotations results/demo/train.json --image-root results/demo/images"),
    "trajectory": ("xmas.trajectory", "top-k singular values of text-to-image attention, one shard of one checkpoint",
                   "xmas trajectory --model results/proxy/checkpoint-1 --checkpoint 1 --shard 0 --shards 2 "
                   "--examples results/data/examples.parquet --annotations results/demo/train.json "
                   "--image-root results/demo/images --out results/trajectories/checkpoint-1/shard-0.parquet"),
    "merge": ("xmas.merge", "merge the shards into results/trajectories.parquet, checking completeness",
              "xmas merge --examples results/data/examples.parquet --checkpoints 5 --out results/trajectories.parquet "
              "results/trajectories/checkpoint-*/shard-*.parquet"),
    "cluster": ("xmas.cluster", "stability and k-means clusters of the trajectories",
                "xmas cluster --examples results/data/examples.parquet --trajectories results/trajectories.parquet "
                "--out results/selection/clusters.parquet"),
    "sample": ("xmas.sample", "pick a subset for a budget (xmas balanced sampling or a baseline)",
               "xmas sample --method xmas --budget 0.5 --examples results/data/examples.parquet "
               "--clusters results/selection/clusters.parquet --annotations results/demo/train.json "
               "--out results/subset_0.5.json"),
    "finetune": ("xmas.finetune", "fine-tune the target model on a subset (LoRA or all weights)",
                 "xmas finetune --base results/target/base --subset results/subset_0.5.json "
                 "--image-root results/demo/images --out results/target/xmas/0.5/seed-0 --lora-r 0"),
    "evaluate": ("xmas.evaluate", "score a fine-tuned target: demo test split or the paper's benchmarks (lmms-eval)",
                 "xmas evaluate --model results/target/xmas/0.5/seed-0 --suite demo --test results/demo/test.json "
                 "--image-root results/demo/images --out results/eval/runs/xmas/0.5/seed-0.tsv"),
    "summarize": ("xmas.summary", "collect the evaluation runs into results/eval/summary.tsv with ARP",
                  "xmas summarize --run xmas 0.5 0 results/eval/runs/xmas/0.5/seed-0.tsv "
                  "--run full 1 0 results/eval/runs/full/1/seed-0.tsv --out results/eval/summary.tsv"),
    "report": ("xmas.report", "write the HTML report: trajectories, clusters, stability, composition, settings",
               "xmas report --examples results/data/examples.parquet --annotations results/demo/train.json "
               "--clusters results/selection/clusters.parquet --trajectories results/trajectories.parquet "
               "--manifest xmas 0.5 results/subset_0.5.manifest.parquet --out results/report.html"),
}


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
    for name, (_, summary, example) in STAGES.items():
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
        module = importlib.import_module(STAGES[name][0])
        module.add_arguments(stage_parsers[name])
    args = parser.parse_args(argv)
    if args.stage is None:
        parser.print_help()
        return 2
    setup_logging(args.verbose)
    try:
        module.run(args)
    except XmasError as error:
        logging.getLogger("xmas").error("%s failed: %s", args.stage, error)
        return 1
    return 0
