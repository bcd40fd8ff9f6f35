"""What every stage shares: logging, progress that reads well in log files, counted stats."""

from __future__ import annotations

import collections
import logging
import os
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from xmas.io import write_json

T = TypeVar("T")
log = logging.getLogger("xmas")


INPUT_ARGUMENTS = {
    "examples": ("--examples", "examples.parquet from `xmas prepare`"),
    "annotations": (
        "--annotations",
        "the records: a JSON list or JSON Lines, parquet shards (a file, folder or glob) or a save_to_disk folder",
    ),
    "image_root": ("--image-root", "folder the records' image paths are relative to (none when images are embedded)"),
}
OPTIONAL_INPUTS = ("image_root",)


def add_input_arguments(parser, *names: str) -> None:
    """The inputs most stages share, with one wording everywhere."""
    for name in names:
        flag, help_text = INPUT_ARGUMENTS[name]
        parser.add_argument(flag, required=name not in OPTIONAL_INPUTS, type=Path, help=help_text)


def add_threads_argument(parser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (the workflow passes the job's threads; default: torch's own)",
    )


def use_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def progress(items: Iterable[T], *, total: int | None = None, desc: str, unit: str = "it") -> Iterator[T]:
    """A tqdm bar on a terminal; on a log file (Slurm, Snakemake ``log:``) a line every 10% instead."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr)
        return
    start, next_report = time.monotonic(), 0.1
    done = 0
    for done, item in enumerate(items, 1):
        yield item
        if total and done / total >= next_report:
            rate = done / max(time.monotonic() - start, 1e-9)
            log.info("%s: %d/%d %s (%.0f%%, %.1f %s/s)", desc, done, total, unit, 100 * done / total, rate, unit)
            next_report = (int(10 * done / total) + 1) / 10
    if not total:
        log.info("%s: %d %s", desc, done, unit)


def peak_memory_mb() -> int:
    """The largest resident set of this process (or of a child it waited for) so far: what a job's
    memory request (config resources) must cover."""
    peaks = [resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return round(max(peaks) / (1024 * 1024 if sys.platform == "darwin" else 1024))  # bytes on macOS, KiB on Linux


def cpu_seconds() -> float:
    """CPU time (user and system) of this process and of the children it waited for."""
    usages = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def gpus_used() -> int:
    """The GPUs this job computed on: one per process of its launch (WORLD_SIZE) once this one has used CUDA;
    0 when it has not (torch is imported only by the stages that compute)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0
    return int(os.environ.get("WORLD_SIZE", "1"))


class StageStats:
    """Counts what a stage took in, wrote out and excluded (by reason); logged and written as JSON."""

    def __init__(self, stage: str):
        self.stage = stage
        self.counts: dict[str, int] = collections.Counter()
        self.excluded: dict[str, int] = collections.Counter()
        self.extra: dict[str, object] = {}
        self._start = time.monotonic()

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def exclude(self, reason: str, n: int = 1) -> None:
        self.excluded[reason] += n

    def set(self, key: str, value: object) -> None:
        self.extra[key] = value

    def clusters(self, labels, k: int) -> None:
        """K and the sizes of the k clusters of ``labels`` (0..k-1): smallest, median, largest."""
        import numpy as np

        sizes = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k) if len(labels) else np.array([0])
        self.set("clusters", k)
        self.set("cluster_size", {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())})

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "counts": dict(self.counts),
            "excluded": dict(sorted(self.excluded.items())),
            "excluded_total": sum(self.excluded.values()),
            "seconds": round(time.monotonic() - self._start, 3),
            "cpu_seconds": round(cpu_seconds(), 3),
            "gpus": gpus_used(),
            "peak_memory_mb": peak_memory_mb(),
            **self.extra,
        }

    def finish(self, path: str | Path | None) -> dict:
        summary = self.as_dict()
        counted = " ".join(f"{key}={value}" for key, value in summary["counts"].items())
        reasons = ", ".join(f"{reason}={n}" for reason, n in summary["excluded"].items())
        log.info(
            "%s done in %.1fs: %s excluded=%d%s",
            self.stage,
            summary["seconds"],
            counted,
            summary["excluded_total"],
            f" ({reasons})" if reasons else "",
        )
        if path:
            write_json(summary, path)
        return summary
