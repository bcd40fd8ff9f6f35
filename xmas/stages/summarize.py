"""Rule ``summarize``: collect the evaluation runs into ``results/eval/summary.tsv`` and print the comparison.

ARP (average relative performance, as the paper reports it) of a run is the mean over benchmarks
of score / full-data score, in %. The full-data score of a benchmark is the mean over the seeds
of the ``full`` runs, so every run of every seed is measured against the same reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from xmas.errors import XmasError
from xmas.evaluation.comparison import comparison_table
from xmas.io import atomic_path
from xmas.progress import StageStats, log

FULL = "full"
COLUMNS = ["method", "budget", "seed", "benchmark", "score", "ARP"]


def read_run(method: str, budget: str, seed: str, path: Path) -> pd.DataFrame:
    try:
        scores = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise XmasError(f"{path}: cannot read the scores of run {method} {budget} seed {seed}: {error}") from None
    missing = {"benchmark", "score"} - set(scores.columns)
    if missing:
        raise XmasError(f"{path}: missing column(s) {', '.join(sorted(missing))} (have {', '.join(scores.columns)})")
    if scores.benchmark.duplicated().any():
        raise XmasError(f"{path}: benchmark {scores.benchmark[scores.benchmark.duplicated()].iloc[0]!r} listed twice")
    return scores[["benchmark", "score"]].assign(method=method, budget=budget, seed=int(seed))


def reference_scores(runs: pd.DataFrame) -> pd.Series:
    """Mean full-data score per benchmark; benchmarks the full runs score 0 on cannot be a denominator."""
    full = runs[runs.method == FULL]
    if full.empty:
        raise XmasError("no run of method 'full': ARP needs the full-data score of every benchmark")
    reference = full.groupby("benchmark").score.mean()
    zero = sorted(reference.index[reference <= 0])
    if zero:
        log.warning("left out of ARP: the full-data runs score 0 on %s", ", ".join(zero))
    if len(zero) == len(reference):
        log.warning(
            "the full-data runs score 0 on every benchmark: ARP (relative to them) is undefined and left "
            "empty; the target learned nothing, train it longer (target.epochs)"
        )
    return reference[reference > 0]


def with_arp(runs: pd.DataFrame) -> pd.DataFrame:
    reference = reference_scores(runs)
    keys = ["method", "budget", "seed"]
    for key, run in runs.groupby(keys):
        lacking = sorted(set(reference.index) - set(run.benchmark))
        if lacking:
            raise XmasError(f"run {' '.join(map(str, key))} has no score for {', '.join(lacking)}")
    relative = runs.benchmark.map(reference)
    runs = runs.assign(relative=100 * runs.score / relative)
    arp = runs.groupby(keys).relative.mean().rename("ARP").round(4)  # NaN where no benchmark counts
    return runs.drop(columns="relative").merge(arp.reset_index(), on=keys)[COLUMNS]


def sort_runs(summary: pd.DataFrame) -> pd.DataFrame:
    order = {method: position for position, method in enumerate(dict.fromkeys(summary.method))}
    return (
        summary.assign(_method=summary.method.map(order), _budget=summary.budget.astype(float))
        .sort_values(["_budget", "_method", "seed", "benchmark"], kind="stable")
        .drop(columns=["_method", "_budget"])
    )


def summarize(runs: list[tuple[str, str, str, Path]], stats: StageStats) -> pd.DataFrame:
    if not runs:
        raise XmasError("no --run given")
    frame = pd.concat([read_run(*run) for run in runs], ignore_index=True)
    duplicated = frame.duplicated(["method", "budget", "seed", "benchmark"])
    if duplicated.any():
        row = frame[duplicated].iloc[0]
        raise XmasError(f"run {row.method} {row.budget} seed {row.seed} is given twice")
    summary = sort_runs(with_arp(frame))
    stats.add("in", len(runs))
    stats.add("out", len(summary))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        nargs=4,
        action="append",
        required=True,
        metavar=("METHOD", "BUDGET", "SEED", "TSV"),
        help="one evaluated run (scores TSV from `xmas evaluate`); repeat for every run, "
        "including the method 'full' runs that ARP is relative to",
    )
    parser.add_argument("--out", required=True, type=Path, help="summary TSV to write")
    parser.add_argument("--table", type=Path, help="also write the printed comparison table to this file")


def run(args: argparse.Namespace) -> None:
    stats = StageStats("summarize")
    summary = summarize([(method, budget, seed, Path(path)) for method, budget, seed, path in args.run], stats)
    with atomic_path(args.out) as tmp:
        summary.to_csv(tmp, sep="\t", index=False, float_format="%.4f")
    table = comparison_table(summary).to_string(index=False) + "\n"
    if args.table:
        with atomic_path(args.table) as tmp:
            tmp.write_text(table)
    else:
        sys.stdout.write(table)
    stats.finish(args.stats)
