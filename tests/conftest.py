"""Shared fixtures: a small generated demo dataset and a tiny proxy built from configs (no downloads)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]


def small_generator_settings(records: int = 240, per_type: int = 4, seed: int = 3, captions: int = 64) -> dict:
    settings = yaml.safe_load((REPO / "xmas/resources/demo/shapes.yaml").read_text())
    settings["seed"] = seed
    settings["train"]["records"] = records
    settings["test"]["per_type"] = per_type
    settings["captions"]["records"] = captions
    return settings


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one state per process, its precision fixed by the first Accelerator: a stage trains once
    per process, these tests many times, in several precisions."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> dict:
    """A generated demo dataset of 240 training records: paths to its annotations and images."""
    from xmas.data.demo import generate
    from xmas.progress import StageStats

    root = tmp_path_factory.mktemp("demo")
    paths = {"train": root / "train.json", "test": root / "test.json", "images": root / "images"}
    generate(small_generator_settings(), paths["train"], paths["test"], paths["images"], StageStats("test"))
    return paths


@pytest.fixture(scope="session")
def tiny_checkpoint(small_demo, tmp_path_factory) -> Path:
    """Checkpoint 0 of the demo-tiny proxy for the small dataset."""
    from xmas.models.presets import init_model, load_presets
    from xmas.progress import StageStats
    from xmas.settings import stage_defaults

    out = tmp_path_factory.mktemp("proxy") / "checkpoint-0"
    init_model(
        stage_defaults("proxy-init", model="demo-tiny"), load_presets(), [small_demo["train"]], out, StageStats("test")
    )
    return out


@pytest.fixture(scope="session")
def small_examples(small_demo, tiny_checkpoint, tmp_path_factory) -> Path:
    from xmas.io import write_parquet
    from xmas.progress import StageStats
    from xmas.settings import stage_defaults
    from xmas.stages.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "examples.parquet"
    table = prepare(
        small_demo["train"], small_demo["images"], stage_defaults("prepare"), 2, StageStats("test"), tiny_checkpoint
    )
    write_parquet(table, out)
    return out


@pytest.fixture(scope="session")
def tiny_encoder(tiny_checkpoint, small_demo):
    """The demo proxy's encoder, reading the small dataset's images."""
    from xmas.models.encoding import ConversationEncoder

    return ConversationEncoder.of_checkpoint(tiny_checkpoint, image_root=small_demo["images"])


@pytest.fixture(scope="session")
def standins(tmp_path_factory) -> dict:
    """Every stand-in of a real model (xmas.models.standins), as ``model_paths``: Hub id -> local folder."""
    from xmas.models.standins import STANDINS, write_standin

    root = tmp_path_factory.mktemp("standins")
    for name in STANDINS:
        write_standin(name, root / name)
    return {hub: str(root / name) for name, (hub, _) in STANDINS.items()}


TARGETS = ["results/subset_0.5.json", "results/random/seed-0/subset_0.5.json"]
# sha256 of the reduced demo's subsets as this version of the method selects them (a refactor must not
# change them); recompute only when an issue changes the method on purpose, and say so in its note.
SUBSET_DIGESTS = {
    "results/subset_0.5.json": "016f17ef126141bd7456b3d064b8d161f38ea93c4531b14786710e9fa74db3fd",
    "results/random/seed-0/subset_0.5.json": "7582a7d855c308030d27a04f1a448d3582f8656820d621339e928d70e273de43",
}


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    """`snakemake` for a project folder, with the folder's config.yaml when it has one."""
    config = [f"--configfile={workdir / 'config.yaml'}"] if (workdir / "config.yaml").is_file() else []
    return [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "workflow/Snakefile"),
        "--directory",
        str(workdir),
        *config,
        *args,
    ]


def launched(processes: int) -> list[str]:
    """`xmas` started as the workflow starts a stage on ``processes`` GPUs (xmas/training/launch.py), with this
    interpreter's accelerate and xmas."""
    from xmas.training.launch import launcher_prefix

    prefix = launcher_prefix(processes)
    if prefix == ["xmas"]:
        return [sys.executable, "-m", "xmas"]
    assert prefix[:2] == ["accelerate", "launch"], prefix
    return [sys.executable, "-m", "accelerate.commands.launch", *prefix[2:]]


def workflow_environment(**extra: str) -> dict[str, str]:
    """Jobs run `xmas` and `python -m snakemake` from the environment of the tests; loopback servers
    are reached without a proxy."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        **extra,
    }


def run_snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        snakemake_command(workdir, *args), capture_output=True, text=True, env=workflow_environment(), timeout=timeout
    )


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """The workflow run in ``workdir``; it must succeed."""
    result = run_snakemake(workdir, *args, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


REDUCED_DEMO = {
    "training": {"checkpoints": 3, "epochs": 1, "threads": 1},
    "trajectory": {"chunk_size": 64},
    "selection": {"budgets": [0.5]},
    # Enough for the small target to learn the answer priors, so that ARP is defined.
    "target": {"learning_rate": 1e-3, "projector_learning_rate": 1e-3},
    "alignment": {"epochs": 1},
    "evaluation": {"seeds": [0]},
}


def reduced_project(root: Path, **overrides) -> Path:
    """A project folder whose config.yaml scales the demo down to run in about a minute."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "generator.yaml").write_text(yaml.safe_dump(small_generator_settings(records=300, per_type=10)))
    config = {**REDUCED_DEMO, "dataset": {"demo": str(root / "generator.yaml")}, **overrides}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def job_counts(dry_run_output: str) -> dict[str, int]:
    """Jobs per rule from the "Job stats" table that `snakemake -n` prints."""
    table = dry_run_output.split("Job stats:")[1]
    return {name: int(n) for name, n in re.findall(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


@pytest.fixture(scope="session")
def workflow_run(tmp_path_factory) -> Path:
    """The reduced demo, run once through Snakemake for the XMAS and random subsets."""
    project = reduced_project(tmp_path_factory.mktemp("run1"))
    snakemake(project, "--cores", "2", *TARGETS)
    return project


# Today's families (xmas.models.families) and the model each is tested with: a proxy preset (its Hub repo
# mapped to the stand-in) or a stand-in's folder. The Llava family is the paper's models' (test_real_models).
MODERN_FAMILIES = {
    "qwen2_5_vl": "qwen2.5-vl-3b",
    "qwen3_vl": "qwen3-vl-2b",
    "idefics3": "smolvlm-256m",
    "smolvlm": "SmolVLM2-256M-Video-Instruct",
    "internvl": "internvl3-1b",
    "llava_onevision": "llava-onevision-0.5b",
    "gemma3": "gemma-3-4b",
}
# Images of many shapes: wide, tall, square, tiny, extreme (an aspect ratio of 7.5).
VARIED_SIZES = [(100, 60), (60, 100), (300, 40), (64, 64), (200, 150), (33, 47)]


def varied_records() -> list[dict]:
    """Image records of every size above (one and two turns, the tag before or after the question) and
    text-only ones."""
    records = []
    for number, (width, height) in enumerate(VARIED_SIZES):
        question = "What is the man holding?" if number % 2 else "How many shapes are in the image?"
        first = f"<image>\n{question}" if number % 3 else f"{question}\n<image>"
        answer = "A red umbrella." if number % 2 else "two"
        turns = [{"from": "human", "value": first}, {"from": "gpt", "value": answer}]
        if number % 2:
            turns += [{"from": "human", "value": "Is it raining?"}, {"from": "gpt", "value": "Yes, it is."}]
        records.append({"id": f"image-{number}", "image": f"{width}x{height}.png", "conversations": turns})
    for number in range(2):
        records.append(
            {
                "id": f"text-{number}",
                "conversations": [
                    {"from": "human", "value": "Explain how a compiler works."},
                    {"from": "gpt", "value": "It starts with a simple idea that grows over time." * (number + 1)},
                ],
            }
        )
    return records


@pytest.fixture(scope="session")
def varied_data(tmp_path_factory) -> dict:
    """Noisy images of VARIED_SIZES with coloured shapes, and varied_records() over them (train.json)."""
    import numpy as np
    from PIL import Image

    from xmas.io import write_records

    root = tmp_path_factory.mktemp("varied")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for width, height in VARIED_SIZES:
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        pixels[height // 4 : height // 2, width // 4 : width // 2] = (220, 30, 30)
        Image.fromarray(pixels).save(images / f"{width}x{height}.png")
    write_records(varied_records(), root / "train.json")
    return {"train": root / "train.json", "images": images}


def modern_checkpoint(family: str, standins: dict, annotations: Path, out: Path, **settings) -> Path:
    """Checkpoint 0 of the family's model (MODERN_FAMILIES), as proxy-init writes it."""
    from xmas.models.presets import init_model, load_presets
    from xmas.models.standins import STANDINS
    from xmas.progress import StageStats
    from xmas.settings import stage_defaults

    model = MODERN_FAMILIES[family]
    if model in STANDINS:  # a folder, as `proxy.model: /models/<name>`
        model = standins[STANDINS[model][0]]
    init_model(
        stage_defaults("proxy-init", model=model, model_paths=standins, **settings),
        load_presets(),
        [annotations],
        out,
        StageStats("test"),
    )
    return out


@pytest.fixture(scope="session")
def modern_checkpoints(standins, varied_data, tmp_path_factory) -> dict[str, Path]:
    """Checkpoint 0 of every family of MODERN_FAMILIES, max_length 2048."""
    root = tmp_path_factory.mktemp("modern")
    return {
        family: modern_checkpoint(family, standins, varied_data["train"], root / family, max_length=2048)
        for family in MODERN_FAMILIES
    }


# LLaMA-Factory's own code reads what we write for it, and checks what we read as its format
# (tests/stages/test_llamafactory.py, tests/stages/test_prepare.py).
LLAMAFACTORY_INSTALL = "bash tools/install-llamafactory.sh"


@pytest.fixture(scope="session")
def llamafactory():
    """LLaMA-Factory's dataset parser, converter and data arguments. Its `data` and `hparams` packages import
    torchaudio and its trainer stack on import, which this CPU install lacks; the three modules used here
    import neither, so they load without their packages' __init__."""
    spec = importlib.util.find_spec("llamafactory")
    if spec is None or importlib.util.find_spec("datasets") is None:
        if os.environ.get("XMAS_REQUIRE_LLAMAFACTORY"):
            missing = "LLaMA-Factory or datasets is missing"
            pytest.fail(f"XMAS_REQUIRE_LLAMAFACTORY is set but {missing}: {LLAMAFACTORY_INSTALL}")
        pytest.skip(f"LLaMA-Factory is not installed ({LLAMAFACTORY_INSTALL}; CI sets XMAS_REQUIRE_LLAMAFACTORY)")
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


def read_back(llamafactory, dataset_dir: Path, name: str, tmp_path: Path, media_dir: Path | None = None) -> list[dict]:
    """The dataset as LLaMA-Factory's training sees it: its dataset_info entry, its file loaded with `datasets`,
    every example aligned to LLaMA-Factory's standard format (images joined to ``media_dir`` where given)."""
    import datasets
    from transformers import Seq2SeqTrainingArguments

    [attr] = llamafactory.parser.get_dataset_list([name], str(dataset_dir))
    assert attr.load_from == "file" and attr.formatting == "sharegpt"
    data = datasets.load_dataset(
        "json", data_files=[str(dataset_dir / attr.dataset_name)], split="train", cache_dir=str(tmp_path / "hf")
    )
    media = {"media_dir": str(media_dir)} if media_dir else {}
    data_args = llamafactory.data_args.DataArguments(dataset_dir=str(dataset_dir), dataset=name, **media)
    training_args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "trainer"))
    return list(llamafactory.converter.align_dataset(data, attr, data_args, training_args))


def assert_llamafactory_reads(llava: dict, example: dict, image_root: Path) -> None:
    """LLaMA-Factory read ``example`` (one aligned by :func:`read_back`) as the LLaVA record ``llava``: the same
    turns, the last answer as its response, the same images, one `<image>` placeholder for each."""
    from xmas.data.records import ROLES, image_paths

    turns = [(ROLES[turn["from"]], turn["value"]) for turn in llava["conversations"]]
    assert [(message["role"], message["content"]) for message in example["_prompt"]] == turns[:-1]
    assert example["_response"] == [{"role": "assistant", "content": turns[-1][1]}]
    images = [str(image_root / path) for path in image_paths(llava)]
    assert (example["_images"] or []) == images and all(Path(path).is_file() for path in images)
    placeholders = sum(message["content"].count("<image>") for message in example["_prompt"])
    assert placeholders == len(images)  # LLaMA-Factory's image placeholder, one per image


def sharegpt_of(llava: dict) -> dict:
    """A LLaVA record in LLaMA-Factory's multimodal ShareGPT form, its image paths relative to the image root
    as an input file holds them (tests/stages/test_prepare.py checks such a file with LLaMA-Factory's code)."""
    from xmas.data.records import ROLES, image_paths

    messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in llava["conversations"]]
    return {"id": llava["id"], "messages": messages, "images": image_paths(llava)}


def feature_settings():
    """The features stage's settings of the tests: the tiny proxy's two layers, small batches and chunks."""
    from xmas.settings import stage_defaults

    return stage_defaults("features", layers=[0, 1], batch_size=5, chunk_size=16, shards=2)


@pytest.fixture(scope="session")
def feature_shards(tiny_checkpoint, small_demo, small_examples, tmp_path_factory) -> list:
    """The small demo's features (rule features), in two shards, from the tiny proxy's checkpoint 0."""
    from xmas.data.examples import shard_slice, usable_image_examples
    from xmas.progress import StageStats
    from xmas.stages.features import extract_features

    usable = usable_image_examples(small_examples)
    folder = tmp_path_factory.mktemp("features")
    paths = []
    for shard in range(2):
        paths.append(folder / f"shard-{shard}.parquet")
        rows = shard_slice(usable, shard, 2)
        extract_features(
            tiny_checkpoint,
            rows,
            small_demo["train"],
            small_demo["images"],
            paths[-1],
            feature_settings(),
            StageStats("t"),
        )
    return paths
