"""The evaluation's comparison: per budget and method, ARP and each benchmark's score as mean ± standard
deviation over the seeds. ``xmas summarize`` prints it; the evaluation report shows it."""

from __future__ import annotations

import pandas as pd


def comparison_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per budget and method: ARP and each benchmark's score, as mean ± standard deviation over seeds."""
    runs = summary.drop_duplicates(["method", "budget", "seed"])
    keys = ["budget", "method"]
    table = runs.groupby(keys, sort=False).agg(seeds=("seed", "nunique"))
    table["ARP"] = mean_and_spread(runs.groupby(keys, sort=False).ARP)
    for benchmark, scores in summary.groupby("benchmark", sort=True):
        table[benchmark] = mean_and_spread(scores.groupby(keys, sort=False).score)
    return table.reset_index()


def mean_and_spread(grouped) -> pd.Series:
    stats = grouped.agg(["mean", "std"])
    return stats.apply(
        lambda row: (
            "n/a" if pd.isna(row["mean"]) else f"{row['mean']:.1f} ± {0 if pd.isna(row['std']) else row['std']:.1f}"
        ),
        axis=1,
    )
