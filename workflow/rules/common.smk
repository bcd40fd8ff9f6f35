# Paths, wildcard constraints and the helpers that turn config sections into CLI flags.
from pathlib import Path

import yaml

from xmas.download import load_manifest, resolve_manifest
from xmas.errors import XmasError

DATASET = config["dataset"]
PROXY = config["proxy"]
TRAINING = config["training"]
TRAJECTORY = config["trajectory"]
SELECTION = config["selection"]
TARGET = config["target"]
EVALUATION = config["evaluation"]

CHECKPOINTS = TRAINING["checkpoints"]
SHARDS = TRAJECTORY["shards"]

# Where the data comes from, by precedence: a dataset to download (dataset.download), your own
# files (dataset.annotations), else the generated demo (config/config.yaml always sets its key).
DOWNLOAD = DATASET.get("download")
USE_DEMO = DOWNLOAD is None and "annotations" not in DATASET


if DOWNLOAD is not None:
    try:
        DOWNLOAD_MANIFEST = str(resolve_manifest(DOWNLOAD))
        _manifest = load_manifest(DOWNLOAD_MANIFEST)
    except XmasError as error:
        raise WorkflowError(f"config dataset.download: {error}")
    DATA_FOLDER = f"{DATASET.get('data_dir', 'data')}/{_manifest.name}"
    ANNOTATIONS = f"{DATA_FOLDER}/{_manifest.annotations}"
    IMAGE_ROOT = f"{DATA_FOLDER}/{_manifest.image_root}"
    DOWNLOAD_REPORT = f"{DATA_FOLDER}/download.json"
    # The download job unpacks the images but does not declare them as output (Snakemake would
    # delete tens of GB before rerunning it); jobs that read images wait for its report instead.
    IMAGE_INPUT = [DOWNLOAD_REPORT]
elif USE_DEMO:
    ANNOTATIONS = "results/demo/train.json"
    IMAGE_ROOT = "results/demo/images"
    # The generated images are a rule output, so jobs that read them must wait for it.
    IMAGE_INPUT = [IMAGE_ROOT]
else:
    if "image_root" not in DATASET:
        raise WorkflowError("config dataset.annotations is set but dataset.image_root is not")
    ANNOTATIONS = DATASET["annotations"]
    IMAGE_ROOT = DATASET["image_root"]
    IMAGE_INPUT = []

EXAMPLES = "results/data/examples.parquet"
SELECTION_METHODS = SELECTION["methods"]
# Baselines whose subset changes with the seed; evaluation draws one subset per seed for them.
SEEDED_METHODS = ("random", "cluster-random")
# The reference every subset is measured against: all usable records, trained and evaluated alike.
FULL = ("full", "1")
TARGET_BASE = "results/target/base"
RESOURCES = Path(workflow.basedir).parent / "resources"
PROXY_PRESETS = str(RESOURCES / "proxy_presets.yaml")
TARGET_PRESETS = TARGET.get("presets", str(RESOURCES / "target_presets.yaml"))
# Local copies of Hub repos (config model_paths); the rehearsal's are stand-ins the workflow writes.
MODEL_PATHS = config["model_paths"]
STANDINS = "results/standins"


wildcard_constraints:
    budget=r"(0?\.\d*[1-9]\d*|1(\.0*)?)",
    checkpoint=r"[1-9]\d*",
    shard=r"\d+",
    seed=r"\d+",
    method=r"[a-z][a-z-]*",


def flags(section, *keys):
    """`--key value` for each key of a config section; booleans become --key / --no-key."""
    rendered = []
    for key in keys:
        value, flag = section[key], "--" + key.replace("_", "-")
        if isinstance(value, bool):
            rendered.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, list):
            rendered.append(f"{flag} {','.join(map(str, value))}")
        elif value is not None:
            rendered.append(f"{flag} {value}")
    return " ".join(rendered)


def model_path_flags():
    return " ".join(f"--model-path {name}={folder}" for name, folder in MODEL_PATHS.items())


def local_copies(model, presets):
    """The local folders (config model_paths) of the Hub repos a model preset, folder or id loads."""
    spec = (yaml.safe_load(Path(presets).read_text()) or {}).get(model, {"path": model})
    names = [spec.get(key) for key in ("language_model", "vision_model", "path", "projector_weights")]
    repos = {"/".join(name.split("/")[:2]) for name in names if name} | set(filter(None, names))
    return sorted(MODEL_PATHS[repo] for repo in repos if repo in MODEL_PATHS)


def init_options(section):
    """How checkpoint 0 encodes records (proxy or target section): conversation, image, max length."""
    return flags(section, "conversation", "image_position", "image_preprocessing", "max_length")


def checkpoint_dir(c):
    return f"results/proxy/checkpoint-{c}"


def methods_and_budgets():
    return [(method, budget) for method in SELECTION_METHODS for budget in SELECTION["budgets"]]


def subset_json(method, budget, seed=None):
    """results/subset_{budget}.json for XMAS, results/{method}/subset_{budget}.json for baselines,
    and results/{method}/seed-{seed}/subset_{budget}.json for a seeded baseline's other seeds."""
    if method == "xmas":
        return f"results/subset_{budget}.json"
    if method in SEEDED_METHODS and seed is not None and int(seed) != SELECTION["seed"]:
        return f"results/{method}/seed-{seed}/subset_{budget}.json"
    return f"results/{method}/subset_{budget}.json"


def subset_manifest(method, budget):
    return subset_json(method, budget).replace(".json", ".manifest.parquet")


def all_subsets():
    return [subset_json(method, budget) for method, budget in methods_and_budgets()]


def evaluation_runs():
    """(method, budget, seed) of every target fine-tune: each method and budget, and the full set, per seed."""
    pairs = [*methods_and_budgets(), FULL]
    return [(method, budget, seed) for method, budget in pairs for seed in EVALUATION["seeds"]]


def target_dir(method, budget, seed):
    return f"results/target/{method}/{budget}/seed-{seed}"


def scores_tsv(method, budget, seed):
    return f"results/eval/runs/{method}/{budget}/seed-{seed}.tsv"


EVAL_SUMMARY = "results/eval/summary.tsv"


def launcher(gpus):
    """The command that starts a stage: `xmas` on up to one GPU, torchrun with one process per GPU beyond."""
    from xmas.engine import launcher_prefix

    return " ".join(launcher_prefix(gpus))
