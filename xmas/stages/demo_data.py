"""Rule ``demo_data``: generate a dataset to run on without downloading one: the demo's shape scenes
(:mod:`xmas.data.demo`) or a small LLaVA-665k-shaped set for rehearsals (:mod:`xmas.data.rehearsal`)."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from xmas.data import demo, rehearsal
from xmas.data.demo import SHIPPED, settings_file
from xmas.errors import XmasError
from xmas.progress import StageStats

GENERATORS = {"shapes": demo.generate, "llava665k-like": rehearsal.generate}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--settings",
        required=True,
        help=f"generator settings: {' or '.join(SHIPPED)} (shipped), or a YAML file of your own",
    )
    parser.add_argument("--train-json", required=True, type=Path, help="where to write the training annotations")
    parser.add_argument("--test-json", required=True, type=Path, help="where to write the held-out annotations")
    parser.add_argument("--image-root", required=True, type=Path, help="folder the image paths are relative to")
    parser.add_argument(
        "--captions-json",
        type=Path,
        help="where to write image-caption records of scenes of their own, for the target's "
        "alignment (shape scenes only)",
    )


def run(args: argparse.Namespace) -> None:
    stats = StageStats("demo-data")
    path = settings_file(args.settings)
    if not path.is_file():
        raise XmasError(f"demo settings {args.settings!r}: no such file, and not one of {', '.join(SHIPPED)}")
    settings = yaml.safe_load(path.read_text())
    kind = settings.get("kind", "shapes")
    if kind not in GENERATORS:
        raise XmasError(f"{path}: kind {kind!r} is not one of {', '.join(GENERATORS)}")
    if args.captions_json is not None and kind != "shapes":
        raise XmasError(f"{path}: a {kind} dataset has no captions; only the shape scenes write them")
    if args.captions_json is not None and "captions" not in settings:
        raise XmasError(f"{path}: --captions-json needs the number of captions to write (captions: {{records: N}})")
    extra = {} if args.captions_json is None else {"captions_json": args.captions_json}
    GENERATORS[kind](settings, args.train_json, args.test_json, args.image_root, stats, **extra)
    stats.finish(args.stats)
