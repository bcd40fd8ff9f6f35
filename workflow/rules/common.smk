# Paths, wildcard constraints and the helpers that turn config sections into CLI flags.
from pathlib import Path

DATASET = config["dataset"]
TRAINING = config["training"]
TRAJECTORY = config["trajectory"]
SELECTION = config["selection"]

CHECKPOINTS = TRAINING["checkpoints"]
SHARDS = TRAJECTORY["shards"]
USE_DEMO = "annotations" not in DATASET

if USE_DEMO:
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
SELECTION_METHODS = ["xmas", "random"]


wildcard_constraints:
    budget=r"(0?\.\d*[1-9]\d*|1(\.0*)?)",
    checkpoint=r"[1-9]\d*",
    shard=r"\d+",


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


def checkpoint_dir(c):
    return f"results/proxy/checkpoint-{c}"


def all_subsets():
    return expand(
        "results/{prefix}subset_{budget}.json",
        prefix=["" if method == "xmas" else f"{method}/" for method in SELECTION_METHODS],
        budget=SELECTION["budgets"],
    )
