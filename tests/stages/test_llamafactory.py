"""`xmas llamafactory` and its rule: the subsets as LLaMA-Factory datasets, read back with LLaMA-Factory's own
dataset parser and format converter over the `datasets` library, as its loader reads a local dataset.

Skipped only where LLaMA-Factory is not installed and XMAS_REQUIRE_LLAMAFACTORY is unset; CI installs it with
tools/install-llamafactory.sh and sets it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from xmas.data.records import image_paths
from xmas.io import write_records

from conftest import REDUCED_DEMO, reduced_project, snakemake

INSTALL = "bash tools/install-llamafactory.sh"


@pytest.fixture(scope="module")
def llamafactory():
    """LLaMA-Factory's dataset parser, converter and data arguments. Its `data` and `hparams` packages import
    torchaudio and its trainer stack on import, which this CPU install lacks; the three modules used here
    import neither, so they load without their packages' __init__."""
    spec = importlib.util.find_spec("llamafactory")
    if spec is None or importlib.util.find_spec("datasets") is None:
        if os.environ.get("XMAS_REQUIRE_LLAMAFACTORY"):
            pytest.fail(f"XMAS_REQUIRE_LLAMAFACTORY is set but LLaMA-Factory or datasets is missing: {INSTALL}")
        pytest.skip(f"LLaMA-Factory is not installed ({INSTALL}; CI sets XMAS_REQUIRE_LLAMAFACTORY)")
    root = Path(spec.submodule_search_locations[0])
    for package in ("data", "hparams"):
        name = f"llamafactory.{package}"
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [str(root / package)]
            sys.modules[name] = stub
    return types.SimpleNamespace(
        parser=importlib.import_module("llamafactory.data.parser"),
        converter=importlib.import_module("llamafactory.data.converter"),
        data_args=importlib.import_module("llamafactory.hparams.data_args"),
    )


def read_back(llamafactory, dataset_dir: Path, name: str, tmp_path: Path) -> list[dict]:
    """The dataset as LLaMA-Factory's training sees it: its dataset_info entry, its file loaded with `datasets`,
    every example aligned to LLaMA-Factory's standard format."""
    import datasets
    from transformers import Seq2SeqTrainingArguments

    [attr] = llamafactory.parser.get_dataset_list([name], str(dataset_dir))
    assert attr.load_from == "file" and attr.formatting == "sharegpt"
    data = datasets.load_dataset(
        "json", data_files=[str(dataset_dir / attr.dataset_name)], split="train", cache_dir=str(tmp_path / "hf")
    )
    data_args = llamafactory.data_args.DataArguments(dataset_dir=str(dataset_dir), dataset=name)
    training_args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "trainer"))
    return list(llamafactory.converter.align_dataset(data, attr, data_args, training_args))


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
        turns = [(turn["from"], turn["value"]) for turn in source["conversations"]]
        roles = {"human": "user", "gpt": "assistant"}
        assert [(roles[role], text) for role, text in turns[:-1]] == [
            (message["role"], message["content"]) for message in example["_prompt"]
        ]
        assert example["_response"] == [{"role": "assistant", "content": turns[-1][1]}]
        expected = [str(small_demo["images"].absolute() / path) for path in image_paths(source)]
        assert (example["_images"] or []) == expected and all(Path(path).is_file() for path in expected)
        placeholders = sum(message["content"].count("<image>") for message in example["_prompt"])
        assert placeholders == len(expected)  # LLaMA-Factory's image placeholder, one per image


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
    write_records([{"id": "a", "conversations": []}, {"id": "b", "messages": []}], tmp_path / "odd.json")
    command = [sys.executable, "-m", "xmas", "llamafactory", "--subset", "x", str(tmp_path / "odd.json"),
               "--image-root", str(tmp_path), "--out", str(tmp_path / "o")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0 and f"{tmp_path / 'odd.json'}: record 1 is not a LLaVA record" in result.stderr
    assert not (tmp_path / "o").exists()
