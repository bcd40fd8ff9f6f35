"""ARP arithmetic and the summary table of `xmas summarize`."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from xmas.errors import XmasError
from xmas.evaluation.comparison import comparison_table
from xmas.progress import StageStats
from xmas.stages.summarize import summarize


def write_run(folder, name, scores: dict[str, float]):
    path = folder / f"{name}.tsv"
    pd.DataFrame({"benchmark": list(scores), "score": list(scores.values())}).to_csv(path, sep="\t", index=False)
    return path


@pytest.fixture
def runs(tmp_path):
    return [
        ("full", "1", "0", write_run(tmp_path, "full0", {"a": 80.0, "b": 40.0})),
        ("full", "1", "1", write_run(tmp_path, "full1", {"a": 60.0, "b": 60.0})),
        ("xmas", "0.1", "0", write_run(tmp_path, "x0", {"a": 70.0, "b": 25.0})),
        ("xmas", "0.1", "1", write_run(tmp_path, "x1", {"a": 35.0, "b": 50.0})),
        ("random", "0.1", "0", write_run(tmp_path, "r0", {"a": 14.0, "b": 5.0})),
    ]


def test_arp_is_the_mean_over_benchmarks_of_score_over_the_mean_full_score(runs):
    summary = summarize(runs, StageStats("test"))
    arp = summary.drop_duplicates(["method", "budget", "seed"]).set_index(["method", "seed"]).ARP
    # Reference: a = (80 + 60) / 2 = 70, b = (40 + 60) / 2 = 50.
    assert arp["xmas", 0] == pytest.approx((70 / 70 + 25 / 50) / 2 * 100)  # 75
    assert arp["xmas", 1] == pytest.approx((35 / 70 + 50 / 50) / 2 * 100)  # 75
    assert arp["random", 0] == pytest.approx((14 / 70 + 5 / 50) / 2 * 100)  # 15
    assert arp["full", 0] == pytest.approx((80 / 70 + 40 / 50) / 2 * 100)
    assert list(summary.columns) == ["method", "budget", "seed", "benchmark", "score", "ARP"]
    assert len(summary) == 10


def test_the_table_shows_mean_and_spread_over_seeds_per_budget_and_method(runs):
    table = comparison_table(summarize(runs, StageStats("test"))).set_index(["budget", "method"])
    assert table.loc[("0.1", "xmas"), "ARP"] == "75.0 ± 0.0"
    assert table.loc[("0.1", "xmas"), "a"] == "52.5 ± 24.7"  # mean 52.5, sample std of 70 and 35
    assert table.loc[("0.1", "xmas"), "seeds"] == 2
    assert table.loc[("0.1", "random"), "ARP"] == "15.0 ± 0.0"


def test_benchmarks_the_full_runs_score_zero_on_are_left_out_of_arp(tmp_path):
    runs = [
        ("full", "1", "0", write_run(tmp_path, "f", {"a": 50.0, "hard": 0.0})),
        ("xmas", "0.5", "0", write_run(tmp_path, "x", {"a": 25.0, "hard": 10.0})),
    ]
    summary = summarize(runs, StageStats("test"))
    assert summary[summary.method == "xmas"].ARP.iloc[0] == pytest.approx(50.0)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("no full", "no run of method 'full'"),
        ("missing benchmark", "run xmas 0.1 0 has no score for b"),
        ("twice", "is given twice"),
        ("bad columns", "missing column(s) score"),
    ],
)
def test_inconsistent_runs_fail_with_a_clear_error(tmp_path, problem, message):
    full = ("full", "1", "0", write_run(tmp_path, "f", {"a": 50.0, "b": 50.0}))
    xmas = ("xmas", "0.1", "0", write_run(tmp_path, "x", {"a": 50.0, "b": 50.0}))
    runs = {
        "no full": [xmas],
        "missing benchmark": [full, ("xmas", "0.1", "0", write_run(tmp_path, "m", {"a": 1.0}))],
        "twice": [full, xmas, xmas],
        "bad columns": [full, ("xmas", "0.1", "0", tmp_path / "bad.tsv")],
    }[problem]
    (tmp_path / "bad.tsv").write_text("benchmark\taccuracy\na\t1\n")
    with pytest.raises(XmasError, match=message.replace("(", r"\(").replace(")", r"\)")):
        summarize(runs, StageStats("test"))


def test_the_cli_writes_the_summary_and_prints_the_table(runs, tmp_path):
    command = [sys.executable, "-m", "xmas", "summarize", "--out", str(tmp_path / "summary.tsv")]
    for run in runs:
        command += ["--run", *map(str, run)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "75.0 ± 0.0" in result.stdout and "budget" in result.stdout
    summary = pd.read_csv(tmp_path / "summary.tsv", sep="\t")
    assert set(summary.method) == {"full", "xmas", "random"}


def test_arp_is_left_empty_when_the_full_runs_score_zero_everywhere(tmp_path, caplog):
    """The scores of a long run are still written; the log says why there is no ARP."""
    runs = [
        ("full", "1", "0", write_run(tmp_path, "f", {"a": 0.0, "b": 0.0})),
        ("xmas", "0.5", "0", write_run(tmp_path, "x", {"a": 5.0, "b": 0.0})),
    ]
    summary = summarize(runs, StageStats("test"))
    assert summary.ARP.isna().all() and sorted(summary.score) == [0.0, 0.0, 0.0, 5.0]
    assert "score 0 on every benchmark: ARP (relative to them) is undefined" in caplog.text
    assert comparison_table(summary).ARP.tolist() == ["n/a", "n/a"]
