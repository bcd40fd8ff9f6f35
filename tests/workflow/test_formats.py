"""A run from each format people hold their data in, through every selection stage and back out in its own
format: LLaMA-Factory's ShareGPT as JSON Lines, a LLaMA-Factory dataset_info.json entry, LLaVA-OneVision-Data's
parquet and The Cauldron's parquet with several images per record (for a proxy that takes them). Every
source record is accounted for in the manifest, and the subsets go to LLaMA-Factory too. (LLaVA's own JSON
is the demo's format: tests/workflow/test_workflow.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from xmas.data.annotations import read_all
from xmas.data.demo import generate
from xmas.data.records import image_paths
from xmas.progress import StageStats
from xmas.stages.llamafactory import ENTRY

from conftest import read_back, run_snakemake, sharegpt_of, small_generator_settings
from published import cauldron_rows, dataset_of, onevision_rows, write_parquet_shards

RECORDS = 96
# The Cauldron's run: a SmolVLM proxy (its stand-in), which takes several images per record
SEVERAL_IMAGES = {
    "model_paths": {"HuggingFaceTB/SmolVLM-256M-Instruct": "results/standins/SmolVLM-256M-Instruct"},
    "proxy": {"model": "smolvlm-256m", "max_length": 1024},
    "training": {"micro_batch_size": 8},
    "trajectory": {"batch_size": 16},
}


def source_data(root: Path, layout: str) -> tuple[dict, list[dict]]:
    """The demo's records in ``layout``, written by the tools that write that format; returns the config's
    ``dataset`` section and the LLaVA records in source order."""
    generate(small_generator_settings(records=RECORDS), root / "train.json", root / "test.json", root / "images",
             StageStats("test"))  # fmt: skip
    records, images = read_all(root / "train.json"), root / "images"
    if layout == "jsonl":
        lines = [json.dumps(sharegpt_of(record), ensure_ascii=False) for record in records]
        (root / "train.jsonl").write_text("".join(line + "\n" for line in lines))
        return {"annotations": str(root / "train.jsonl"), "image_root": str(images)}, records
    if layout == "dataset_info":
        (root / "mine.json").write_text(json.dumps([sharegpt_of(record) for record in records], indent=1))
        (root / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json", **ENTRY}}))
        return {"annotations": str(root / "dataset_info.json"), "entry": "mine", "image_root": str(images)}, records
    if layout == "onevision":
        write_parquet_shards(dataset_of(onevision_rows(records, images), "onevision"), root / "onevision")
        return {"annotations": str(root / "onevision")}, records
    second = image_paths(records[0])
    several = {number: second for number, record in enumerate(records) if image_paths(record) and number % 3 == 0}
    write_parquet_shards(dataset_of(cauldron_rows(records, images, several), "cauldron"), root / "cauldron")
    records = [
        {**record, "images": image_paths(record) + several.get(number, [])} for number, record in enumerate(records)
    ]
    return {"annotations": str(root / "cauldron/train-*.parquet"), "format": "parquet", "max_images": 2}, records


def project(root: Path, dataset: dict, layout: str) -> Path:
    root.mkdir(parents=True)
    config = {
        "dataset": dataset,
        "training": {"checkpoints": 2, "epochs": 1, "threads": 1},
        "trajectory": {"shards": 1, "chunk_size": 64},
        "selection": {"budgets": [0.5], "methods": ["xmas", "random"]},
    }
    if layout == "cauldron":
        for section, values in SEVERAL_IMAGES.items():
            config[section] = {**config.get(section, {}), **values}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


SUFFIX = {"jsonl": ".jsonl", "dataset_info": ".json", "onevision": ".parquet", "cauldron": ".parquet"}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(SUFFIX))
def test_a_run_from_each_format_writes_its_subsets_in_that_format(layout, llamafactory, tmp_path):
    import datasets

    dataset, records = source_data(tmp_path / "data", layout)
    work = project(tmp_path / "run", dataset, layout)
    subsets = [f"results/subset_0.5{SUFFIX[layout]}", f"results/random/seed-0/subset_0.5{SUFFIX[layout]}"]
    result = run_snakemake(work, "--cores", "2", *subsets, "results/llamafactory")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for subset in subsets:
        manifest = pd.read_parquet(work / subset.replace(SUFFIX[layout], ".manifest.parquet"))
        assert len(manifest) == len(records) and manifest.uid.is_unique  # every source record, once
        assert not manifest.reason.fillna("").str.startswith("excluded").any()
        chosen = manifest.loc[manifest.selected, "index"].tolist()
        assert len(chosen) == len(records) // 2
        if SUFFIX[layout] == ".parquet":
            read = datasets.load_dataset("parquet", data_files=str(work / subset), split="train")
            shards = sorted(str(path) for path in (tmp_path / "data").rglob("*.parquet"))
            whole = datasets.load_dataset("parquet", data_files=shards, split="train")
            assert read.features == whole.features and len(read) == len(chosen)
            key = "id" if layout == "onevision" else "texts"
            assert read[key] == [whole[index][key] for index in chosen]
        elif layout == "jsonl":
            lines = (tmp_path / "data/train.jsonl").read_text().splitlines()
            assert (work / subset).read_text().splitlines() == [lines[index] for index in chosen]
        else:
            source = json.loads((tmp_path / "data/mine.json").read_text())
            assert json.loads((work / subset).read_text()) == [source[index] for index in chosen]
    info = json.loads((work / "results/llamafactory/dataset_info.json").read_text())
    aligned = read_back(llamafactory, work / "results/llamafactory", "xmas_0.5", tmp_path)
    assert len(aligned) == len(records) // 2 and set(info) == {"xmas_0.5", "random_0.5"}
    assert all(Path(image).is_file() for example in aligned for image in example["_images"] or [])
    if layout == "cauldron":
        counts = [len(example["_images"] or []) for example in aligned]
        assert 2 in counts  # several images per record went through every stage


def test_asking_for_a_json_subset_of_parquet_data_names_the_file_to_ask_for(tmp_path):
    dataset, _ = source_data(tmp_path / "data", "onevision")
    work = project(tmp_path / "run", dataset, "onevision")
    result = run_snakemake(work, "-n", "results/subset_0.5.json")
    assert result.returncode != 0
    assert "its subsets keep its format: ask for results/subset_0.5.parquet" in result.stdout + result.stderr
    planned = run_snakemake(work, "-n", "results/subset_0.5.parquet")
    assert planned.returncode == 0, planned.stderr[-3000:]
