"""The HTML reports: the selection's, built from the selection alone, and the evaluation's, with the
comparison of the methods; built by the workflow, every figure renders in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pandas as pd
import pytest

from xmas.progress import progress, setup_logging
from xmas.stages.report import arp_curves, stage_counts

from conftest import REPO, job_counts, reduced_project, snakemake

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = REPO / "test-artifacts"
# trajectories, stability, cluster quotas, composition by source and by question type, and the gradient
# coherence (coherence.enabled, the demo's default)
SELECTION_FIGURES = 6
# and ARP vs budget
EVALUATION_FIGURES = SELECTION_FIGURES + 1


@pytest.fixture(scope="module")
def report(workflow_run):
    snakemake(workflow_run, "--cores", "2", "results/report.html")
    return workflow_run / "results/report.html"


@pytest.fixture(scope="module")
def evaluation_report(workflow_run):
    snakemake(workflow_run, "--cores", "2", "results/eval/report.html")
    return workflow_run / "results/eval/report.html"


def test_the_selection_report_waits_for_no_fine_tune(tmp_path):
    counts = job_counts(snakemake(reduced_project(tmp_path), "-n", "results/report.html").stdout)
    assert counts["report"] == 1 and counts["cluster"] == 1
    assert not {"target_init", "finetune_target", "evaluate", "summarize"} & set(counts)


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("XMAS_REQUIRE_BROWSER"):
            pytest.fail("XMAS_REQUIRE_BROWSER is set but chromium / chromedriver are not installed")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_every_figure_renders_in_chromium(evaluation_report, browser):
    browser.get(evaluation_report.as_uri())
    sizes = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);"
    )
    assert len(sizes) == EVALUATION_FIGURES
    assert all(complete and width > 0 and height > 0 for complete, width, height in sizes), sizes
    headings = browser.execute_script("return Array.from(document.querySelectorAll('h3')).map(h => h.textContent);")
    assert "Subset composition by question type" in headings and "Counts per stage" in headings
    assert "Average relative performance vs budget" in headings
    height = browser.execute_script("return document.body.scrollHeight;")
    browser.set_window_size(1200, height + 100)
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "report.png"))


@pytest.mark.slow
def test_report_is_self_contained_and_shows_the_run(report):
    page = report.read_text()
    assert "<img" in page and 'src="http' not in page and "<script" not in page
    assert page.count("data:image/png;base64,") == SELECTION_FIGURES
    assert '"checkpoints": 3' in page  # the run's configuration
    assert "train-segment 3" in page and "trajectory checkpoint 3 shard 1" in page  # counts per stage
    assert "<h2>Evaluation</h2>" not in page
    cost = page.split("<h2>What selection cost</h2>")[1].split("<h2>")[0]
    assert "<td>proxy training</td>" in cost and "<td>sample random</td>" in cost
    assert "<td>reference features</td>" in cost and "<td>coincide clusters</td>" in cost
    first_screen = page.split("<h2>Subsets</h2>")[0]
    assert (
        "Reference VLM of coincide, semdedup: the proxy&#x27;s last checkpoint, trained on these records"
        in first_screen
    )
    # which models selected the data, and what shaped their inputs (checkpoint 0's stats)
    proxy = json.loads((report.parent.parent / "logs/stats/proxy/checkpoint-0.json").read_text())
    assert f"Proxy: demo-tiny (llava, {proxy['parameters'] / 1e6:.1f}M parameters; conversation demo" in first_screen
    assert (
        "images native" in first_screen and "max_length" in first_screen and "trained on these records" in first_screen
    )
    premise = page.split("<h2>Does XMAS's premise hold on this data?</h2>")[1].split("<h2>")[0]
    assert "Mean cosine inside clusters" in premise and "random groupings of the same sizes" in premise


@pytest.mark.slow
def test_the_evaluation_report_compares_methods_over_seeds(evaluation_report, workflow_run):
    page = evaluation_report.read_text()
    assert page.count("data:image/png;base64,") == EVALUATION_FIGURES
    assert "<h2>Evaluation</h2>" in page and "ARP and score per benchmark" in page
    summary = pd.read_csv(workflow_run / "results/eval/summary.tsv", sep="\t", dtype={"budget": str})
    table = page.split("ARP and score per benchmark")[1].split("</table>")[0]
    header = re.findall(r"<th>(.*?)</th>", table)
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in table.split("<tbody>")[1].split("</tr>")[:-1]]
    # one row per method and budget, whatever the number of seeds and benchmarks
    assert len(rows) == len(summary.drop_duplicates(["method", "budget"]))
    assert {row[header.index("method")] for row in rows} == set(summary.method)
    assert set(summary.benchmark) <= set(header) and all("±" in row[header.index("ARP")] for row in rows)
    cost = page.split("<h2>What selection cost</h2>")[1].split("<h2>")[0]
    assert "<th>× a full fine-tune</th>" in cost and "<td>xmas</td>" in cost


def test_arp_figure_and_table_from_an_evaluation_summary():
    summary = pd.DataFrame(
        {
            "method": ["xmas"] * 4 + ["random"] * 4,
            "budget": [0.1, 0.1, 0.5, 0.5] * 2,
            "seed": [0, 1] * 4,
            "benchmark": ["demo"] * 8,
            "score": [0.5] * 8,
            "ARP": [95.0, 96.0, 99.0, 100.0, 93.0, 94.0, 98.0, 99.0],
        }
    )
    figure = arp_curves(summary)
    assert figure.png.startswith(b"\x89PNG") and "relative performance" in figure.title


def test_stage_counts_table(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a/x.json").write_text(
        json.dumps(
            {
                "stage": "prepare",
                "seconds": 1.5,
                "peak_memory_mb": 412,
                "counts": {"in": 3, "out": 3, "ok": 2},
                "excluded_total": 1,
            }
        )
    )
    table = stage_counts(tmp_path)
    assert table.to_dict("records") == [
        {"stage": "prepare", "seconds": 1.5, "peak MB": 412, "in": 3, "out": 3, "excluded": 1, "other counts": "ok=2"}
    ]


def test_progress_in_a_log_file_is_a_line_every_tenth(capfd):
    assert not sys.stderr.isatty()
    setup_logging()
    assert list(progress(range(50), total=50, desc="work", unit="item")) == list(range(50))
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and "\r" not in "".join(lines)
    assert "work: 5/50 item (10%" in lines[0] and "work: 50/50 item (100%" in lines[-1]


def test_a_target_set_up_already_is_described_with_the_proxy(tmp_path):
    """The first screen names both models: family, size and what shaped their inputs, from checkpoint 0's stats."""
    from xmas.stages.report import models_text

    def checkpoint_stats(path, **facts):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps(facts))

    encoding = {"max_length": 2048, "image_position": "front", "image_preprocessing": "native"}
    checkpoint_stats("proxy/checkpoint-0.json", model="smolvlm-256m", family="idefics3", parameters=256_484_000,
                     encoding={**encoding, "conversation": "model", "max_pixels": 4194304,
                               "image_tokens": {"fewest": 64, "most": 1088}})  # fmt: skip
    config = {"proxy": {"model": "smolvlm-256m"}, "target": {"model": "qwen2.5-vl-7b"}}
    assert models_text(config, ["xmas"], tmp_path) == (
        "Proxy: smolvlm-256m (idefics3, 256.5M parameters; its own chat template, images native, max_pixels 4194304, "
        "64 to 1088 image tokens, max_length 2048), trained on these records. Target: qwen2.5-vl-7b."
    )
    checkpoint_stats("target/base.json", model="qwen2.5-vl-7b", family="qwen2_5_vl", parameters=8_292_166_656,
                     encoding={**encoding, "conversation": "model", "min_pixels": 1024, "max_pixels": 262144,
                               "image_tokens": {"fewest": 4, "most": 334}})  # fmt: skip
    assert "Target: qwen2.5-vl-7b (qwen2_5_vl, 8.29B parameters; its own chat template, images native, " in (
        models_text(config, ["xmas"], tmp_path)
    )
