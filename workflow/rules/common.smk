# What every file under rules/ shares, the config's sections and flags(); the rest is split by concern:
# sources.smk (where the data and captions come from), paths.smk (where outputs go), resources.smk
# (what a job asks a cluster for), inputs.smk (rules' input functions) and damaged.smk (outputs whose
# seal no longer matches). Parse time reads the config and defines names; it changes no file.
# Settings reach each stage as options generated from the config schema (xmas.settings.stage_flags).
# Nothing here imports torch.
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
# - "No log directive defined" for the plan: it prints its table to the terminal and writes no file, as a
#   command that only looks should.
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from xmas.data.demo import settings_file
from xmas.data.download import load_manifest, resolve_manifest
from xmas.data.examples import usable_count
from xmas.data.sources import llamafactory_entry, open_source
from xmas.errors import XmasError
from xmas.io import copy_sealed, damaged_outputs, set_aside
from xmas.methods import METHODS, signal_prefix
from xmas.resources import resource
from xmas.settings import config_settings, job_resources, stage_flags
from xmas.training.launch import launcher_prefix
from xmas.training.schedule import checkpoint_count

DATASET = config["dataset"]
PROXY = config["proxy"]
TRAINING = config["training"]
TRAJECTORY = config["trajectory"]
FEATURES = config["features"]
SELECTION = config["selection"]
COHERENCE = config["coherence"]
TARGET = config["target"]
ALIGNMENT = config["alignment"]
EVALUATION = config["evaluation"]
MODEL_PATHS = config["model_paths"]


def flags(stage):
    """The config's values of a stage's settings, as its options."""
    return stage_flags(config, stage)
