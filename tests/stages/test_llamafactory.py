"""`xmas llamafactory` and its rule: the subsets as LLaMA-Factory datasets, read back with LLaMA-Factory's own
dataset parser and format converter over the `datasets` library, as its loader reads a local dataset.

Skipped only where LLaMA-Factory is not installed and XMAS_REQUIRE_LLAMAFACTORY is unset; CI installs it with
tools/install-llamafactory.sh and sets it.
"""

from __future__ import annotations

import json
import subprocess
import sys

from xmas.data.records import image_paths
from xmas.io import write_records

from conftest import REDUCED_DEMO, assert_llamafactory_reads, read_back, reduced_project, snakemake


def test_a_subset_reads_back_in_llamafactory_as_it_was_selected(llamafactory, small_demo, tmp_path):
    records = json.loads(small_demo["train"].read_text())
    with_images = [record for record in records if image_paths(record)][:5]
    text_only = {"id": "sum", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    multi_turn = {**with_images[0], "id": "turns"}
    multi_turn["conversations"] = [*with_images[0]["conversations"], {"from": "human", "value": "And?"},
                                   {"from": "gpt", "value": "Nothing more."}]  # fmt: skip
    subset = [*with_images, text_only, multi_turn]
    write_records(subset, tmp_path / "subset.json")
    out = tmp_path / "llamafactory"
    command = [sys.executable, "-m", "xmas", "llamafactory", "--subset", "xmas_0.5", str(tmp_path / "subset.json"),
               "--image-root", str(small_demo["images"]), "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)

    aligned = read_back(llamafactory, out, "xmas_0.5", tmp_path)
    assert len(aligned) == len(subset)
    for source, example in zip(subset, aligned):
        assert_llamafactory_reads(source, example, small_demo["images"].absolute())


def test_two_subsets_under_one_name_are_refused(tmp_path):
    write_records([], tmp_path / "a.json")
    subset = ["--subset", "x", str(tmp_path / "a.json")]
    command = [sys.executable, "-m", "xmas", "llamafactory", *subset, *subset, "--image-root", str(tmp_path),
               "--out", str(tmp_path / "o")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0 and "dataset names must differ: x, x" in result.stderr
    assert not (tmp_path / "o").exists()


def test_the_rule_exports_every_method_and_budget(tmp_path):
    selection = {**REDUCED_DEMO["selection"], "methods": ["xmas", "random"], "budgets": [0.2, 0.5]}
    project = reduced_project(tmp_path, selection=selection)
    out = snakemake(project, "-n", "-p", "results/llamafactory").stdout
    [command] = [line for line in out.splitlines() if line.startswith("Shell command: xmas llamafactory")]
    for method in ("xmas", "random"):
        for budget in ("0.2", "0.5"):
            assert f"--subset {method}_{budget} results/{method}/seed-0/subset_{budget}.json" in command


def test_a_record_that_is_not_llavas_is_named(tmp_path):
    write_records([{"id": "a", "conversations": []}, {"id": "b", "text": "no turns"}], tmp_path / "odd.json")
    command = [sys.executable, "-m", "xmas", "llamafactory", "--subset", "x", str(tmp_path / "odd.json"),
               "--image-root", str(tmp_path), "--out", str(tmp_path / "o")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0 and f"{tmp_path / 'odd.json'}: record 1 is not a LLaVA record" in result.stderr
    assert not (tmp_path / "o").exists()
