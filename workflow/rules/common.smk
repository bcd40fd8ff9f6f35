# Paths, wildcard constraints and the helpers rules share. Settings reach each stage as options
# generated from the config schema (xmas.settings.stage_flags). Nothing here imports torch.
#
# `snakemake --lint` findings left on purpose:
# - "Specify a conda environment or container for each rule": every rule runs one `xmas` stage from
#   the one environment the README installs (torch, transformers, faiss); an environment per rule
#   would build that stack once per rule, and could not install this package from the checkout.
# - "Environment variable XMAS_GPU_PARTITION used but not asserted with envvars": it is optional
#   (unset, GPU jobs go to the default partition); `envvars:` would make every run require it.
# - "Param image_root is a prefix of input or output file but hardcoded": IMAGE_ROOT is the dataset's
#   image folder, an input for the demo (IMAGE_INPUT) and vouched for by the download's report for
#   real data; rules read images from it by name, as LLaVA's own training code does.
import os
import sys
from pathlib import Path

import yaml

from xmas.data.demo import settings_file
from xmas.data.download import load_manifest, resolve_manifest
from xmas.data.examples import usable_count
from xmas.errors import XmasError
from xmas.io import copy_sealed, set_aside_damaged
from xmas.methods import METHODS
from xmas.resources import resource
from xmas.settings import config_settings, job_resources, stage_flags
from xmas.training.launch import launcher_prefix
from xmas.training.schedule import checkpoint_count

DATASET = config["dataset"]
PROXY = config["proxy"]
TRAINING = config["training"]
TRAJECTORY = config["trajectory"]
SELECTION = config["selection"]
TARGET = config["target"]
ALIGNMENT = config["alignment"]
EVALUATION = config["evaluation"]

SHARDS = TRAJECTORY["shards"]

# Where the data comes from, by precedence: a dataset to download (dataset.download), your own
# files (dataset.annotations), else a generated dataset (dataset.demo).
DOWNLOAD = DATASET.get("download")
GENERATED = DOWNLOAD is None and "annotations" not in DATASET
# A shipped generator by name, else the user's settings file.
DEMO_SETTINGS = str(settings_file(DATASET["demo"]))

if DOWNLOAD is not None:
    try:
        DOWNLOAD_MANIFEST = str(resolve_manifest(DOWNLOAD))
        _manifest = load_manifest(DOWNLOAD_MANIFEST)
    except XmasError as error:
        raise WorkflowError(f"config dataset.download: {error}")
    DATA_FOLDER = f"{DATASET['data_dir']}/{_manifest.name}"
    ANNOTATIONS = f"{DATA_FOLDER}/{_manifest.annotations}"
    IMAGE_ROOT = f"{DATA_FOLDER}/{_manifest.image_root}"
    DOWNLOAD_REPORT = f"{DATA_FOLDER}/download.json"
    # The download job unpacks the images but does not declare them as output (Snakemake would
    # delete tens of GB before rerunning it); jobs that read images wait for its report instead.
    IMAGE_INPUT = [DOWNLOAD_REPORT]
elif GENERATED:
    ANNOTATIONS = "results/demo/train.json"
    IMAGE_ROOT = "results/demo/images"
    # The generated images are a rule output, so jobs that read them must wait for it.
    IMAGE_INPUT = [IMAGE_ROOT]
else:
    ANNOTATIONS = DATASET["annotations"]
    IMAGE_ROOT = DATASET["image_root"]
    IMAGE_INPUT = []

# The target's alignment (LLaVA's first stage), when asked for: on the demo generator's captions or on a
# caption file of the user's. Every fine-tune starts from its result.
ALIGN_CAPTIONS = ALIGNMENT["captions"]


def demo_captions_missing():
    """Why the demo generator writes no captions for this config, or None when it does."""
    if not GENERATED:
        return "this dataset is not generated"
    if not Path(DEMO_SETTINGS).is_file():
        return None  # demo_data names the missing settings file
    settings = yaml.safe_load(Path(DEMO_SETTINGS).read_text()) or {}
    if settings.get("kind", "shapes") != "shapes":
        return f"dataset.demo {DATASET['demo']!r} writes none"
    if "captions" not in settings:
        return f"{DEMO_SETTINGS} sets no `captions: {{records: N}}`"
    return None


# A config that asks for the demo's captions without the demo's shape scenes can still select; only
# planning a fine-tune fails (target_start).
ALIGN_PROBLEM = demo_captions_missing() if ALIGN_CAPTIONS == "demo" else None
if ALIGN_CAPTIONS == "demo":
    ALIGN_CAPTIONS = None if ALIGN_PROBLEM else "results/demo/captions.json"
    ALIGN_IMAGE_ROOT, ALIGN_IMAGE_INPUT = IMAGE_ROOT, IMAGE_INPUT
elif ALIGN_CAPTIONS is not None:
    ALIGN_IMAGE_ROOT, ALIGN_IMAGE_INPUT = ALIGNMENT["image_root"], []
TARGET_BASE = "results/target/base"
TARGET_ALIGNED = "results/target/aligned"

# CPUs (Slurm --cpus-per-task) and GPUs of the rules that use more than one CPU or can use a GPU.
THREADS = {
    "prepare": 2,
    "train_segment": TRAINING["threads"],
    "trajectory": TRAJECTORY["threads"],
    "pretrain_target": ALIGNMENT["threads"],
    "finetune_target": TARGET["threads"],
    "evaluate": EVALUATION["threads"],
}
GPUS = {
    "train_segment": TRAINING["gpus"],
    "trajectory": TRAJECTORY["gpus"],
    "pretrain_target": TARGET["gpus"],
    "finetune_target": TARGET["gpus"],
    "evaluate": EVALUATION["gpus"],
}
# What each rule's jobs ask for, filled in by job() as the rules are defined (`snakemake plan`).
PLANNED = {}

EXAMPLES = "results/data/examples.parquet"
CLUSTERS = "results/selection/clusters.parquet"
SELECTION_METHODS = SELECTION["methods"]
# The reference every subset is measured against: all usable records, trained and evaluated alike.
FULL = ("full", "1")
PROXY_PRESETS = PROXY["presets"] or str(resource("proxy_presets.yaml"))
TARGET_PRESETS = TARGET["presets"] or str(resource("target_presets.yaml"))
MODEL_PATHS = config["model_paths"]
STANDINS = "results/standins"
EVAL_SUMMARY = "results/eval/summary.tsv"

# Snakemake trusts any output with a recent time stamp; outputs whose files no longer match their seal
# (cut short, emptied, a checkpoint missing a file) are set aside here so that they are made again. Only
# the run the user started does it: jobs Snakemake itself spawns (Slurm, subprocesses) parse this file too.
if not (workflow.remote_exec or workflow.subprocess_exec):
    for line in set_aside_damaged("results"):
        print(f"xmas: {line}", file=sys.stderr)


wildcard_constraints:
    budget=r"(0?\.\d*[1-9]\d*|1(\.0*)?)",
    checkpoint=r"[1-9]\d*",
    shard=r"\d+",
    seed=r"\d+",
    method=r"[a-z][a-z-]*",


def flags(stage):
    """The config's values of a stage's settings, as its options."""
    return stage_flags(config, stage)


def job(rule_name):
    """The resources a job of ``rule_name`` asks a cluster for. Memory (growing with the retry
    attempt) and wall time come from the config's resources; one node; the GPUs of its settings.
    Jobs that use a GPU go to the partition XMAS_GPU_PARTITION names, when set (profiles/slurm)."""
    wanted = job_resources(config, rule_name)
    resources = {
        "mem_mb": lambda wildcards, attempt: wanted["mem_mb"] * attempt,
        "runtime": wanted["runtime"],
        # torchrun --standalone runs every process of a job on one node
        "nodes": 1,
    }
    if rule_name in GPUS:
        resources["gpu"] = GPUS[rule_name]
    if GPUS.get(rule_name) and os.environ.get("XMAS_GPU_PARTITION"):
        resources["slurm_partition"] = os.environ["XMAS_GPU_PARTITION"]
    PLANNED[rule_name] = {"CPUs": THREADS.get(rule_name, 1), "GPUs": GPUS.get(rule_name, 0), "nodes": 1, **wanted}
    return resources


def plan_table():
    """`snakemake plan`: what each rule's jobs ask for under this config, as a Markdown table. Variants
    (trajectory_loss, evaluation_report, ...) ask for what their rule does."""
    unused = set()
    if not GENERATED:
        unused.add("demo_data")
    if not any(path.startswith(STANDINS) for path in MODEL_PATHS.values()):
        unused.add("standin_model")
    rows = [
        "| rule | CPUs | GPUs | nodes | memory (MB) | runtime (min) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, asked in PLANNED.items():
        if name in unused:
            continue
        rows.append(
            f"| {name} | {asked['CPUs']} | {asked['GPUs']} | {asked['nodes']} | {asked['mem_mb']} | {asked['runtime']} |"
        )
    return "\n".join(rows)


def launcher(gpus):
    """`xmas` on up to one GPU, torchrun with one process per GPU beyond."""
    return " ".join(launcher_prefix(gpus))


def hub_repo(name):
    """`owner/repo` of a Hub id or of a file in a repo (`owner/repo/path/file`)."""
    owner, _, rest = name.partition("/")
    return f"{owner}/{rest.partition('/')[0]}"


def local_copies(model, presets):
    """The local folders (config model_paths) of the Hub repos a model preset, folder or id loads."""
    spec = (yaml.safe_load(Path(presets).read_text()) or {}).get(model, {"path": model})
    names = [spec.get(key) for key in ("language_model", "vision_model", "path", "projector_weights")]
    repos = {hub_repo(name) for name in names if name} | set(filter(None, names))
    return sorted(MODEL_PATHS[repo] for repo in repos if repo in MODEL_PATHS)


def checkpoint_dir(c):
    return f"results/proxy/checkpoint-{c}"


def methods_and_budgets():
    return [(method, budget) for method in SELECTION_METHODS for budget in SELECTION["budgets"]]


def subset_json(method, budget, seed=None):
    """results/{method}/seed-{seed}/subset_{budget}.json. Only seeded baselines draw one subset per
    evaluation seed; the others are fixed by selection.seed."""
    seed = seed if METHODS[method].seeded and seed is not None else SELECTION["seed"]
    return f"results/{method}/seed-{seed}/subset_{budget}.json"


def subset_manifest(method, budget):
    return subset_json(method, budget).replace(".json", ".manifest.parquet")


def all_subsets():
    return [subset_json(method, budget) for method, budget in methods_and_budgets()]


def signal_folder(signal):
    """Where a signal's trajectories and clusters go: results/ for XMAS's attention, results/<signal>/ else."""
    return "results" if signal == "attention" else f"results/{signal}"


def clusters_of(method):
    """The clusters a method samples from (xmas.methods: those of its signal's trajectories), else None."""
    signal = METHODS[method].signal
    return None if signal is None else f"{signal_folder(signal)}/selection/clusters.parquet"


def sample_inputs(method):
    inputs = {"examples": EXAMPLES, "annotations": ANNOTATIONS}
    if clusters_of(method):
        inputs["clusters"] = clusters_of(method)
    return inputs


def clusters_option(method):
    return f"--clusters {clusters_of(method)}" if clusters_of(method) else ""


def evaluation_runs():
    """(method, budget, seed) of every target fine-tune: each method and budget, and the full set, per seed."""
    pairs = [*methods_and_budgets(), FULL]
    return [(method, budget, seed) for method, budget in pairs for seed in EVALUATION["seeds"]]


def proxy_checkpoints():
    """C: training.checkpoints, or with training.save_every_steps one per that many steps of the proxy's
    training, which needs the usable records counted (the prepare checkpoint)."""
    if TRAINING["save_every_steps"] is None:
        return TRAINING["checkpoints"]
    return checkpoint_count(usable_count(checkpoints.prepare.get().output[0]), config_settings(config, "merge"))


def trajectory_shards(folder):
    """Every (checkpoint, shard) file of one signal's trajectories."""
    return [
        f"{folder}/checkpoint-{checkpoint}/shard-{shard}.parquet"
        for checkpoint in range(1, proxy_checkpoints() + 1)
        for shard in range(SHARDS)
    ]


def target_start(wildcards):
    """What every fine-tune starts from: the aligned target, else checkpoint 0 when no alignment is asked for."""
    if ALIGN_PROBLEM:
        raise WorkflowError(
            "config alignment.captions: `demo` aligns the target on the captions of the demo's shape scenes, but "
            f"{ALIGN_PROBLEM}: set alignment.captions to a caption file of your own, or to null when the target "
            "is aligned already (LLaVA-1.5's released projector)"
        )
    return TARGET_BASE if ALIGN_CAPTIONS is None else TARGET_ALIGNED


def target_dir(method, budget, seed):
    return f"results/target/{method}/{budget}/seed-{seed}"


def scores_tsv(method, budget, seed):
    return f"results/eval/runs/{method}/{budget}/seed-{seed}.tsv"


def evaluation_test():
    """The held-out split the exact-match suite scores: evaluation.test, else the generated dataset's.
    Checked when an evaluation is in the DAG, so a selection-only run never trips over it."""
    if "test" in EVALUATION:
        return EVALUATION["test"], EVALUATION["test_image_root"]
    if not GENERATED:
        raise WorkflowError(
            "config evaluation.suite is 'exact-match' but the data is not generated: set evaluation.test and"
            " evaluation.test_image_root (a held-out LLaVA-format file; its records' question_type, else"
            " source, names the benchmarks)"
            " or evaluation.suite: lmms-eval"
        )
    return "results/demo/test.json", "results/demo/images"


def evaluation_inputs(method, budget, seed):
    inputs = {"model": target_dir(method, budget, seed)}
    # the held-out split: the exact-match suite's, or lmms-eval's local `heldout` tasks built from it
    if EVALUATION["suite"] == "exact-match" or "heldout" in EVALUATION["benchmarks"]:
        inputs["test"], inputs["test_images"] = evaluation_test()
    return inputs


def test_options(input):
    return f"--test {input.test} --image-root {input.test_images}" if "test" in input.keys() else ""
