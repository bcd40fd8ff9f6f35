"""What the selection cost, from the stats every job writes (``logs/stats/``, :class:`xmas.progress.StageStats`):
wall, CPU and GPU seconds per stage, each method's selection (the stages it needs, once, and its own sample
jobs), and that cost against one full-data fine-tune of the target (the paper: 0.18 for the proxy's training
and 0.16 for the trajectories, 0.34 in all).

A job's CPU seconds are its main process's and those of the children it waited for; its GPU seconds are
its wall seconds times the GPUs it computed on. Costs compare in GPU seconds when the run used a GPU, else
in CPU seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from xmas.io import read_json
from xmas.methods import FEATURES, METHODS, SIGNALS, signal_prefix


@dataclass(frozen=True)
class Stage:
    name: str
    pattern: str  # the stats files of its jobs, under logs/stats (workflow/rules/*.smk)
    # Which methods need it: None every method; "any" those with a signal (the proxy); a signal's methods; "features"
    # the feature methods; a feature's method.
    needed_by: str | None


def selection_stages() -> tuple[Stage, ...]:
    """The selection's stages, in DAG order, as the workflow's rules write their stats: every method's, the
    proxy's training, each signal's trajectories, merge and clusters, the reference VLM (unless it is the
    proxy) and its features, each feature's clusters. Sampling is each method's own (sample/<method>/)."""
    stages = [
        Stage("proxy checkpoint 0", "proxy/checkpoint-0.json", None),
        Stage("prepare", "prepare.json", None),
        Stage("proxy training", "proxy/checkpoint-[1-9]*.json", "any"),
    ]
    for signal in SIGNALS:
        prefix = signal_prefix(signal)
        stages += [
            Stage(f"{signal} trajectories", f"{prefix}trajectories/*/*.json", signal),
            Stage(f"{signal} merge", f"{prefix}merge.json", signal),
            Stage(f"{signal} clusters", f"{prefix}cluster.json", signal),
        ]
    stages += [
        Stage("reference model", "reference.json", "features"),
        Stage("reference features", "features/*.json", "features"),
    ]
    stages += [Stage(f"{feature} clusters", f"{feature}/cluster.json", feature) for feature in FEATURES]
    return tuple(stages)


STAGES = selection_stages()
FULL_FINETUNE = "target/full/*/*.json"  # the reference: one full-data fine-tune per evaluation seed
COLUMNS = ["jobs", "wall s", "CPU s", "GPU s"]


def job_costs(files: list[Path]) -> dict[str, float]:
    """Jobs, and the sums of their wall, CPU and GPU seconds."""
    stats = [read_json(path) for path in files]
    return {
        "jobs": len(stats),
        "wall s": sum(job.get("seconds", 0.0) for job in stats),
        "CPU s": sum(job.get("cpu_seconds", 0.0) for job in stats),
        "GPU s": sum(job.get("seconds", 0.0) * job.get("gpus", 0) for job in stats),
    }


def stage_costs(stats_dir: Path, methods: list[str]) -> pd.DataFrame:
    """One row per stage that ran (and per method's sampling): its jobs and their seconds."""
    rows = {stage.name: job_costs(sorted(stats_dir.glob(stage.pattern))) for stage in STAGES}
    for method in methods:
        rows[f"sample {method}"] = job_costs(sorted(stats_dir.glob(f"sample/{method}/*/*.json")))
    table = pd.DataFrame.from_dict(rows, orient="index", columns=COLUMNS)
    return table[table.jobs > 0]


def needs(stage: Stage, method: str) -> bool:
    """Whether ``method``'s selection needs ``stage``. A feature method whose reference is the proxy borrows
    the proxy's training, which is not counted to it: COINCIDE's own reference is an off-the-shelf model."""
    declared = METHODS[method]
    wanted = {None}
    if declared.signal is not None:
        wanted |= {"any", declared.signal}
    if declared.features is not None:
        wanted |= {"features", declared.features}
    return stage.needed_by in wanted


def method_costs(stats_dir: Path, methods: list[str]) -> pd.DataFrame:
    """Per method: its selection's cost (the stages it needs and its own sampling) in the run's unit, and that
    cost over one full-data fine-tune of the target (the mean over its seeds) where one has run."""
    stages = stage_costs(stats_dir, methods)
    unit = "GPU s" if stages["GPU s"].sum() > 0 else "CPU s"
    full = sorted(stats_dir.glob(FULL_FINETUNE))
    reference = job_costs(full)[unit] / len(full) if full else None
    rows = []
    for method in methods:
        names = [stage.name for stage in STAGES if needs(stage, method)] + [f"sample {method}"]
        cost = stages.loc[stages.index.intersection(names), unit].sum()
        row = {"method": method, unit: round(cost, 1)}
        if reference:
            row["× a full fine-tune"] = round(cost / reference, 3)
        rows.append(row)
    return pd.DataFrame(rows)
