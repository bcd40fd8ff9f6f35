"""Rule ``standin_model``: write an offline stand-in of a real model (:mod:`xmas.models.standins`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from xmas.models.standins import STANDINS, write_standin
from xmas.progress import StageStats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name",
        required=True,
        choices=tuple(STANDINS),
        help="which model: " + "; ".join(f"{name} stands for {hub}" for name, (hub, _) in STANDINS.items()),
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to write (a local copy of the Hub repo)")


def run(args: argparse.Namespace) -> None:
    stats = StageStats(f"standin-model {args.name}")
    write_standin(args.name, args.out)
    stats.add("out", 1)
    stats.set("stands_for", STANDINS[args.name][0])
    stats.finish(args.stats)
