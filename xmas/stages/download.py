"""Rule ``download``: fetch a real dataset (LLaVA-665k, Vision-Flan) into the layout LLaVA's training
code expects, resumable and verified (:mod:`xmas.data.download`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from xmas.data.download import Downloader, load_manifest, resolve_manifest
from xmas.io import write_json
from xmas.progress import StageStats
from xmas.settings import default_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", required=True, help="llava665k, visionflan (shipped manifests), or a manifest file (.yaml)"
    )
    parser.add_argument(
        "--dest",
        type=Path,
        help=f"dataset folder (default: {default_of('dataset.data_dir')}/<name>, config dataset.data_dir)",
    )
    parser.add_argument("--report", type=Path, help="what was downloaded, as JSON (default: <dest>/download.json)")
    parser.add_argument("--keep-archives", action="store_true", help="keep image archives after unpacking them")
    parser.add_argument("--retries", type=int, default=5, help="resumes of an interrupted transfer before giving up")
    parser.add_argument("--retry-wait", type=float, default=5.0, help="seconds before the first resume (doubles)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a transfer is retried")
    parser.add_argument("--workers", type=int, default=8, help="parallel requests for URL lists (OCR-VQA images)")


def run(args: argparse.Namespace) -> None:
    manifest = load_manifest(resolve_manifest(args.dataset))
    dest = args.dest or Path(default_of("dataset.data_dir")) / manifest.name
    stats = StageStats(f"download {manifest.name}")
    downloader = Downloader(
        manifest,
        dest,
        keep_archives=args.keep_archives,
        retries=args.retries,
        retry_wait=args.retry_wait,
        timeout=args.timeout,
        workers=args.workers,
    )
    files = downloader.run(stats)
    stats.add("in", len(manifest.entries))
    stats.add("out", sum(item["status"] != "missing" for item in files.values()))
    for name, item in files.items():
        if item["status"] == "missing":
            stats.exclude(f"missing:{name}")
    report = {
        "dataset": manifest.name,
        "manifest": str(manifest.path),
        "annotations": str(dest / manifest.annotations),
        "image_root": str(dest / manifest.image_root),
        "files": files,
    }
    write_json(report, args.report or dest / "download.json")
    stats.finish(args.stats)
