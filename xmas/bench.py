"""Benchmarks: ``python -m xmas.bench <name> ...``; each prints what it measured.

``prepare``: generate a LLaVA-format file the size of LLaVA-665k (text-only records, so no image
is checked) and time ``xmas prepare`` on it in a child process: wall seconds and peak memory
(the child's maximum resident set size). Target: at most 60 s and 4 GB.

To add a benchmark, write ``add_<name>(subparsers)`` that registers its parser with
``set_defaults(run=...)`` and list it in ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a image shows what is of in on and to with man woman dog cat car street table food people "
         "color red blue green white black two three left right top bottom behind near large small sitting "
         "standing holding wearing playing looking building sign tree sky water field room window door light "
         "question answer describe explain why how many where which code function python list value return "
         "error file data model train write story poem summary example number because however therefore").split()
NON_ASCII = ["café", "naïve", "Zürich", "東京", "данные", "😀", "señor", "über"]


def sentence_pool(rng: random.Random, size: int = 4000) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(6, 24))).capitalize() + "." for _ in range(size)]


def generated_record(index: int, rng: random.Random, pool: list[str], non_ascii: float) -> dict:
    """A ShareGPT-like text-only record of LLaVA-665k: 1-5 exchanges, about 1.5 KB of JSON on average."""
    turns = []
    for exchange in range(rng.choice((1, 1, 1, 2, 3, 5))):
        question = " ".join(rng.choices(pool, k=rng.randint(1, 3)))
        answer = " ".join(rng.choices(pool, k=rng.randint(1, 8)))
        if rng.random() < non_ascii:
            answer += " " + rng.choice(NON_ASCII)
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": f"{rng.getrandbits(40):010x}_{index % 7}", "model": "", "conversations": turns}


def generate(path: Path, records: int, seed: int, non_ascii: float, indent: int | None) -> None:
    """A JSON list written record by record (never all in memory), formatted as ``json.dump`` would."""
    rng = random.Random(seed)
    pool = sentence_pool(rng)
    encoder = json.JSONEncoder(ensure_ascii=False, indent=indent or None)
    pad = "\n" + " " * indent if indent else "\n"
    with open(path, "w", encoding="utf-8") as out:
        out.write("[")
        for index in range(records):
            text = encoder.encode(generated_record(index, rng, pool, non_ascii))
            out.write(("," if index else "") + pad + (text.replace("\n", pad) if indent else text))
        out.write("\n]\n")


def measure(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident memory (bytes) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.monotonic()
    subprocess.run(command, check=True)
    seconds = time.monotonic() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib < before:  # ru_maxrss is the maximum over all children waited for
        peak_kib = before
    return seconds, peak_kib * 1024


def run_prepare(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="xmas-bench-"))
    annotations = args.file or work / "annotations.json"
    if args.file is None or not annotations.exists():
        start = time.monotonic()
        generate(annotations, args.records, args.seed, args.non_ascii, args.indent)
        print(f"generated {args.records} records, {annotations.stat().st_size / 1e9:.2f} GB, in "
              f"{time.monotonic() - start:.0f}s: {annotations}", flush=True)
    out = work / "examples.parquet"
    command = [sys.executable, "-m", "xmas", "prepare", "--annotations", str(annotations), "--image-root", str(work),
               "--out", str(out), "--no-check-images", "--stats", str(work / "prepare.json")]
    seconds, peak = measure(command)
    counts = json.loads((work / "prepare.json").read_text())["counts"]
    met = seconds <= args.max_seconds and peak <= args.max_gb * 1e9
    print(f"prepare: {counts['in']} records in {seconds:.1f} s wall, peak memory {peak / 1e9:.2f} GB "
          f"({counts['in'] / seconds:,.0f} records/s)")
    print(f"target: <= {args.max_seconds:g} s and <= {args.max_gb:g} GB: {'met' if met else 'NOT met'}")
    if args.keep:
        print(f"kept in {work}")
    else:
        shutil.rmtree(work)  # a --file of your own lies outside it and stays
    return 0 if met else 1


def add_prepare(subparsers) -> None:
    parser = subparsers.add_parser("prepare", help="time `xmas prepare` on a generated 665k-record file",
                                   description=run_prepare.__doc__ or __doc__)
    parser.add_argument("--records", type=int, default=665_000, help="records to generate (default 665,000)")
    parser.add_argument("--file", type=Path, help="annotation file to use; generated there if it does not exist")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (generated file, examples.parquet)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--non-ascii", type=float, default=0.01, help="share of records with non-ASCII text")
    parser.add_argument("--indent", type=int, default=4, help="JSON indentation of the file (0: one record a line)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="target wall time")
    parser.add_argument("--max-gb", type=float, default=4.0, help="target peak memory")
    parser.set_defaults(run=run_prepare)


BENCHMARKS = [add_prepare]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmas.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="benchmark", metavar="<benchmark>", required=True)
    for add in BENCHMARKS:
        add(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
