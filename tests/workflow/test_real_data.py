"""Real-data plumbing through Snakemake: `dataset.download` plans and runs the download rule; a dataset
with bad records and repeated ids, served over loopback HTTP, selects from its good records and
lists every bad one in the manifest with its reason; a malformed annotation file stops prepare
with the file, line and column."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from xmas.data.annotations import read_all
from xmas.data.demo import generate
from xmas.progress import StageStats

from conftest import TARGETS, run_snakemake, small_generator_settings
from corpus import bad_records, write_bad_images
from loopback import FileServer


def project(root: Path, dataset: dict) -> Path:
    """The demo scaled down, with the given `dataset` keys."""
    root.mkdir(parents=True, exist_ok=True)
    config = {
        "dataset": dataset,
        "training": {"checkpoints": 2, "epochs": 1, "threads": 1},
        "trajectory": {"shards": 1, "chunk_size": 64},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def test_a_download_config_plans_the_whole_run_without_the_data(tmp_path):
    root = project(tmp_path, {"download": "llava665k"})
    result = run_snakemake(root, "-n", "results/subset_0.5.json")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = result.stdout
    assert "rule download:" in plan and "resources/llava665k/llava_v1_5_mix665k.json" in plan
    assert "--image-root resources/llava665k/images" in plan and "demo_data" not in plan
    assert not (root / "resources").exists()  # planning touches no data


def zipped_folder(folder: Path, top: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                bundle.write(path, f"{top}/{path.relative_to(folder).as_posix()}")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def messy_dataset(tmp_path_factory):
    """200 good demo records, 3 repeated ids and the bad-record corpus, served as a download."""
    root = tmp_path_factory.mktemp("messy")
    generate(
        small_generator_settings(records=200),
        root / "train.json",
        root / "test.json",
        root / "images",
        StageStats("test"),
    )
    good = read_all(root / "train.json")
    write_bad_images(root / "images")
    bad = bad_records()
    records = [*good, *good[:3], *[record for record, _ in bad]]
    annotations = json.dumps(records, indent=1).encode()
    files = {
        "/messy/train.json": annotations,
        "/messy/images.zip": zipped_folder(root / "images", "pictures"),
        "/broken/train.json": b'[\n {"id": "a", "conversations": []},\n {"id": "b" "conversations": []}\n]\n',
    }
    with FileServer(files) as server:
        for name in ("messy", "broken"):
            (root / f"{name}.yaml").write_text(
                yaml.safe_dump(
                    {
                        "name": name,
                        "annotations": "train.json",
                        "image_root": "images",
                        "files": [
                            {
                                "name": "annotations",
                                "url": server.url(f"/{name}/train.json"),
                                "save_as": "train.json",
                                "sha256": hashlib.sha256(files[f"/{name}/train.json"]).hexdigest(),
                            },
                            {
                                "name": "images",
                                "url": server.url("/messy/images.zip"),
                                "unpack": {"member": "pictures", "to": "images"},
                            },
                        ],
                    }
                )
            )
        yield {"root": root, "records": records, "good": len(good), "bad": bad, "server": server}


@pytest.mark.slow
def test_bad_records_are_listed_with_their_reasons_and_the_rest_is_selected(messy_dataset, tmp_path):
    work = project(tmp_path / "run", {"download": str(messy_dataset["root"] / "messy.yaml")})
    result = run_snakemake(work, "--cores", "2", *TARGETS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records, good, bad = messy_dataset["records"], messy_dataset["good"], messy_dataset["bad"]
    assert json.loads((work / "resources/messy/download.json").read_text())["files"]["images"]["status"] == "downloaded"
    examples = pd.read_parquet(work / "results/data/examples.parquet")
    assert len(examples) == len(records) and examples.uid.is_unique
    repeated = examples.iloc[good : good + 3]
    assert repeated.uid.tolist() == [f"{record['id']}#2" for record in records[:3]]
    n_valid = good + 3
    for target in TARGETS:
        manifest = pd.read_parquet(work / target.replace(".json", ".manifest.parquet"))
        assert manifest.uid.tolist() == examples.uid.tolist()  # every source record, once, in source order
        listed = manifest.iloc[n_valid:]
        assert listed.reason.tolist() == [f"excluded:{reason}" for _, reason in bad] and not listed.selected.any()
        subset_bytes = (work / target).read_bytes()
        subset = json.loads(subset_bytes)
        assert len(subset) == round(0.5 * n_valid) == manifest.selected.sum()
        assert subset == [records[i] for i in manifest.loc[manifest.selected, "index"]]
    stats = json.loads((work / "logs/stats/sample/xmas/seed-0/0.5.json").read_text())
    assert stats["counts"]["selected"] + stats["counts"]["not_selected"] + stats["excluded_total"] == len(records)
    assert json.loads((work / "logs/stats/prepare.json").read_text())["excluded"] == {
        reason: sum(1 for _, r in bad if r == reason) for _, reason in bad
    }

    again = run_snakemake(work, "-n", *TARGETS)  # complete: nothing to download or run again
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_a_malformed_annotation_file_stops_prepare_at_its_line_and_column(messy_dataset, tmp_path):
    work = project(tmp_path / "run", {"download": str(messy_dataset["root"] / "broken.yaml")})
    result = run_snakemake(work, "--cores", "1", "results/data/examples.parquet")
    assert result.returncode != 0
    # The demo proxy learns its tokenizer from the records, so proxy-init reads the file first.
    log = (work / "logs/proxy/checkpoint-0.log").read_text()
    assert "proxy-init failed: resources/broken/train.json: not valid JSON at line 3, column 13" in log
    assert "Traceback" not in log
