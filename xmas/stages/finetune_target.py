"""Rule ``finetune_target``: fine-tune the target VLM on one subset, the measure of whether a subset
is any good.

The target starts from its checkpoint 0 (``xmas target-init``), or from its alignment on captions
(``xmas pretrain-target``) when the config asks for one. Every subset, budget and seed is fine-tuned
from that same start with the same recipe (:mod:`xmas.training.finetune`: all weights, or LoRA as the
paper's recipe), so the subsets are the only difference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xmas.data.sources import stage_source
from xmas.progress import StageStats, add_input_arguments, add_threads_argument, use_threads
from xmas.settings import add_settings, settings_of
from xmas.training.engine import context_from_environment
from xmas.training.finetune import finetune


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="the target's checkpoint 0 (from `xmas target-init`)")
    parser.add_argument(
        "--subset", required=True, type=Path, help="subset to fine-tune on (as `xmas sample` writes it)"
    )
    add_input_arguments(parser, "image_root")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the fine-tuned target to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and the LoRA initialisation")
    add_threads_argument(parser)
    add_settings(parser, "finetune-target")


def run(args: argparse.Namespace) -> None:
    use_threads(args.threads)
    stats = StageStats(f"finetune-target {args.out}")
    settings = settings_of(args, "finetune-target")
    subset = stage_source(args.subset, settings)
    finetune(args.base, subset, args.image_root, args.out, settings, args.seed, stats)
    stats.finish(args.stats if context_from_environment().is_main else None)
