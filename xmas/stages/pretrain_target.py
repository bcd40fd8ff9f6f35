"""Rule ``pretrain_target``: align the target on image–caption pairs, once, before every fine-tune.

LLaVA-1.5 starts instruction tuning from a projector that a first stage (feature alignment) trained
on image–caption pairs, the vision tower and language model frozen (``--trainable projector``). The
demo target's projector and language model start from random weights, so it trains them all
(``--trainable all``; its vision tower stays frozen and random, ``--freeze-vision-tower``) on the
captions the demo generator writes for scenes of its own. Both run on the fine-tuning engine
(:func:`xmas.training.finetune.finetune`), with the alignment's epochs, batch and learning rate
and the target section's engine settings (precision, DeepSpeed, micro-batches).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from xmas.progress import StageStats, add_input_arguments, add_threads_argument, use_threads
from xmas.settings import add_settings, settings_class, settings_of
from xmas.training.engine import context_from_environment
from xmas.training.finetune import finetune


def alignment_settings(alignment):
    """The fine-tuning engine's settings for the alignment (``alignment``: the pretrain-target stage's): its
    own and the target section's engine settings, all weights (but a frozen vision tower) or the projector
    (``trainable``, :func:`run`), no LoRA, no saves."""
    fine_tune = {field.name for field in dataclasses.fields(settings_class("finetune-target"))}
    shared = {key: value for key, value in dataclasses.asdict(alignment).items() if key in fine_tune}
    return settings_class("finetune-target")(
        **shared, lora_r=0, projector_learning_rate=alignment.learning_rate, save_every_steps=0
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="the target's checkpoint 0 (from `xmas target-init`)")
    parser.add_argument(
        "--captions",
        required=True,
        type=Path,
        help="image-caption records to align on (LLaVA format, as LLaVA's blip_laion_cc_sbu_558k.json)",
    )
    add_input_arguments(parser, "image_root")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the aligned target to")
    add_threads_argument(parser)
    add_settings(parser, "pretrain-target")


def run(args: argparse.Namespace) -> None:
    use_threads(args.threads)
    stats = StageStats(f"pretrain-target {args.out}")
    alignment = settings_of(args, "pretrain-target")
    finetune(
        args.base,
        args.captions,
        args.image_root,
        args.out,
        alignment_settings(alignment),
        alignment.seed,
        stats,
        projector_only=alignment.trainable == "projector",
    )
    stats.finish(args.stats if context_from_environment().is_main else None)
