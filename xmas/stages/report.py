"""Rule ``report``: ``results/report.html``, one self-contained page showing what was selected and why,
built from the selection alone. With ``--eval-summary`` (rule ``evaluation_report``,
``results/eval/report.html``) the page adds the evaluation: ARP against the budget, and the
comparison of every method and budget (mean ± standard deviation over the seeds).

Every figure is a PNG embedded in the page, so the file can be mailed or opened offline.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import importlib.metadata
import io
import json
import platform
from pathlib import Path

import numpy as np
import pandas as pd

from xmas.data.sources import Source, as_source, stage_source
from xmas.errors import XmasError
from xmas.evaluation.comparison import comparison_table
from xmas.evaluation.cost import method_costs, stage_costs
from xmas.io import atomic_path, read_json, read_parquet
from xmas.methods import METHODS
from xmas.progress import StageStats, add_input_arguments
from xmas.settings import add_settings, settings_of

LARGEST_CLUSTERS = 6
SAMPLED_CLUSTERS = 6
VERSIONED_PACKAGES = ("xmas", "torch", "transformers", "faiss-cpu", "snakemake", "numpy", "pandas")


@dataclasses.dataclass
class Figure:
    title: str
    caption: str
    png: bytes

    def html(self) -> str:
        data = base64.b64encode(self.png).decode()
        return (
            f'<figure><h3>{html.escape(self.title)}</h3><img alt="{html.escape(self.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(self.caption)}</figcaption></figure>'
        )


@dataclasses.dataclass
class Subset:
    method: str
    budget: str
    manifest: pd.DataFrame

    @property
    def label(self) -> str:
        return f"{self.method} {self.budget}"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    pyplot().close(figure)
    return buffer.getvalue()


def trajectory_curves(trajectories: pd.DataFrame, clusters: pd.DataFrame, seed: int = 0) -> Figure:
    """Mean and spread of the trajectory (sum of the top-k values) per cluster, over checkpoints."""
    plt = pyplot()
    values = trajectories.filter(regex=r"^sv\d+$").sum(axis=1)
    frame = trajectories[["uid", "checkpoint"]].assign(value=values).merge(clusters[["uid", "cluster"]], on="uid")
    sizes = clusters[clusters.cluster >= 0].cluster.value_counts()
    largest = list(sizes.index[:LARGEST_CLUSTERS])
    rest = list(sizes.index[LARGEST_CLUSTERS:])
    draw = np.random.default_rng(seed).choice
    sampled = sorted(draw(rest, min(SAMPLED_CLUSTERS, len(rest)), replace=False)) if rest else []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, chosen, title in ((axes[0], largest, "largest clusters"), (axes[1], sampled, "a sample of the rest")):
        for cluster in chosen:
            stats = frame[frame.cluster == cluster].groupby("checkpoint").value.agg(["mean", "std"]).fillna(0)
            (line,) = ax.plot(stats.index, stats["mean"], marker="o", label=f"cluster {cluster} (n={sizes[cluster]})")
            ax.fill_between(
                stats.index,
                stats["mean"] - stats["std"],
                stats["mean"] + stats["std"],
                color=line.get_color(),
                alpha=0.15,
            )
        ax.set(title=title, xlabel="checkpoint")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("sum of top-k singular values")
    return Figure(
        "Trajectories per cluster",
        "Mean (line) and ± one standard deviation (band) over the examples of each cluster, at every proxy checkpoint.",
        render(figure),
    )


def stability_distribution(subsets: list[Subset]) -> Figure:
    plt = pyplot()
    xmas = [s for s in subsets if s.method == "xmas"]
    figure, axes = plt.subplots(1, len(xmas), figsize=(max(7.0, 4.5 * len(xmas)), 3.5), squeeze=False)
    for ax, subset in zip(axes[0], xmas):
        images = subset.manifest[subset.manifest.stability.notna()]
        bins = np.histogram_bin_edges(images.stability, bins=30)
        ax.hist(images.stability[images.selected], bins=bins, alpha=0.7, label="selected")
        ax.hist(images.stability[~images.selected], bins=bins, alpha=0.7, label="not selected")
        ax.set(title=f"budget {subset.budget}", xlabel="stability (lower = more stable)", ylabel="examples")
        ax.legend(fontsize=8)
    return Figure(
        "Stability, selected vs not selected",
        "Stability S = Σ_t |x(t) − x(t−1)| of the image examples; inside each cluster XMAS keeps the most stable ones.",
        render(figure),
    )


def cluster_quotas(clusters: pd.DataFrame, subsets: list[Subset]) -> Figure:
    plt = pyplot()
    sizes = clusters[clusters.cluster >= 0].cluster.value_counts()
    figure, ax = plt.subplots(figsize=(11, 3.8))
    positions = np.arange(len(sizes))
    ax.bar(positions, sizes.to_numpy(), color="#cccccc", label="cluster size")
    for subset in (s for s in subsets if s.method == "xmas"):
        taken = subset.manifest[subset.manifest.selected].cluster.value_counts()
        ax.plot(
            positions, [taken.get(c, 0) for c in sizes.index], marker=".", label=f"selected, budget {subset.budget}"
        )
    ax.set(xlabel="clusters, largest first", ylabel="examples", title=f"{len(sizes)} clusters")
    ax.legend(fontsize=8)
    return Figure(
        "Cluster sizes and quotas filled",
        "Grey bars: examples per cluster. Lines: how many of them "
        "each XMAS budget took (small clusters are filled first, large ones are capped).",
        render(figure),
    )


def composition(full: pd.Series, subsets: list[Subset], by: str) -> Figure:
    """Share of records per category (source or question type) in the full set and in every subset."""
    plt = pyplot()
    shares = {"full set": full.value_counts(normalize=True)}
    for subset in subsets:
        chosen = subset.manifest.loc[subset.manifest.selected, "index"]
        shares[subset.label] = full.loc[chosen].value_counts(normalize=True)
    table = pd.DataFrame(shares).fillna(0.0).sort_index()
    figure, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(table.columns)
    for position, column in enumerate(table.columns):
        ax.bar(np.arange(len(table)) + position * width, table[column], width, label=column)
    ax.set_xticks(np.arange(len(table)) + 0.4 - width / 2, table.index, rotation=30, ha="right")
    ax.set(ylabel="share of records")
    ax.legend(fontsize=8, ncol=2)
    return Figure(
        f"Subset composition by {by}",
        f"Share of each {by} in the full set (usable records) and in every subset.",
        render(figure),
    )


def coherence_section(result: dict) -> str:
    """The gradient-coherence diagnostic: its figures, and the histogram of the pairs' cosines."""
    plt = pyplot()
    bins = np.array(result["histogram"]["bins"])
    centres = (bins[:-1] + bins[1:]) / 2
    figure, ax = plt.subplots(figsize=(7, 3.2))
    for name in ("inside", "across"):
        counts = np.array(result["histogram"][name], dtype=float)
        ax.plot(centres, counts / max(counts.sum(), 1), marker=".", label=f"pairs {name} clusters")
    ax.set(xlabel="cosine similarity of the two examples' gradients", ylabel="share of pairs")
    ax.legend(fontsize=8)
    random = result["random_gap"]
    verdict = (
        "above what random groupings give: the clusters group examples that train alike"
        if result["gap"] > random["mean"] + 2 * random["sd"]
        else "within what random groupings give: on this data the clusters say little about the gradients"
    )
    caption = (
        f"{result['examples']} image examples from {result['clusters']} clusters, gradients at "
        f"{result['checkpoint']} count-sketched to {result['dimensions']} dimensions. Mean cosine inside clusters "
        f"{result['inside']:.3f}, across {result['across']:.3f}: a gap of {result['gap']:.3f}, against "
        f"{random['mean']:.3f} ± {random['sd']:.3f} for {result['groupings']} random groupings of the same sizes; "
        f"{verdict}."
    )
    return (
        "<h2>Does XMAS's premise hold on this data?</h2>"
        + Figure("Gradient coherence of the clusters", caption, render(figure)).html()
    )


def arp_curves(summary: pd.DataFrame) -> Figure:
    plt = pyplot()
    runs = summary.groupby(["method", "budget", "seed"]).ARP.first().reset_index()
    figure, ax = plt.subplots(figsize=(7, 4))
    for method, rows in runs.groupby("method"):
        stats = rows.groupby("budget").ARP.agg(["mean", "std"]).fillna(0)
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"], marker="o", capsize=3, label=method)
    ax.axhline(100, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="budget (fraction of the data)", ylabel="ARP (% of full-data score)")
    ax.legend()
    return Figure(
        "Average relative performance vs budget",
        "Mean over seeds (error bar: standard deviation) of the mean over benchmarks of score / full-data score.",
        render(figure),
    )


def table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, classes="table", na_rep="", float_format=lambda v: f"{v:.3g}")


def stage_counts(stats_dir: Path) -> pd.DataFrame:
    """One row per job: seconds, in, out, excluded, and whatever else it counted."""
    rows = []
    for path in sorted(stats_dir.rglob("*.json")):
        stats = read_json(path)
        counts = dict(stats.get("counts", {}))
        rows.append(
            {
                "stage": stats.get("stage", path.stem),
                "seconds": stats.get("seconds"),
                "peak MB": stats.get("peak_memory_mb", ""),
                "in": counts.pop("in", ""),
                "out": counts.pop("out", ""),
                "excluded": stats.get("excluded_total", 0),
                "other counts": ", ".join(f"{key}={value}" for key, value in counts.items()),
            }
        )
    return pd.DataFrame(rows)


def cost_tables(stats_dir: Path, methods: list[str]) -> dict[str, str]:
    """The page's cost section (:mod:`xmas.evaluation.cost`); against a full-data fine-tune once one has run."""
    if not stats_dir.is_dir():
        return {"reference": "", "stage_costs": "<p>no stats</p>", "method_costs": ""}
    per_method = method_costs(stats_dir, methods)
    compared = "× a full fine-tune" in per_method.columns
    return {
        "reference": ", against one full-data fine-tune of the target (the mean over its seeds)" if compared else "",
        "stage_costs": table_html(seconds_as_text(stage_costs(stats_dir, methods).rename_axis("stage").reset_index())),
        "method_costs": table_html(seconds_as_text(per_method)),
    }


def seconds_as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Seconds as people read them (12.3, 4,567), ratios to three places."""
    shown = frame.copy()
    for column in shown.columns:
        if column.endswith(" s"):
            shown[column] = [f"{value:,.0f}" if value >= 100 else f"{value:.1f}" for value in shown[column]]
        elif column.startswith("×"):
            shown[column] = [f"{value:.3f}" for value in shown[column]]
    return shown


def versions() -> pd.DataFrame:
    rows = [{"package": "python", "version": platform.python_version()}]
    for package in VERSIONED_PACKAGES:
        try:
            rows.append({"package": package, "version": importlib.metadata.version(package)})
        except importlib.metadata.PackageNotFoundError:
            rows.append({"package": package, "version": "not installed"})
    return pd.DataFrame(rows)


def subset_table(subsets: list[Subset], n_valid: int) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"method": s.method, "budget": s.budget, "selected": int(s.manifest.selected.sum()), "of usable": n_valid}
            for s in subsets
        ]
    )


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>XMAS selection report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
figure {{ margin: 1.5rem 0; }} img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: 0.9rem; }}
table.table {{ border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }}
table.table td, table.table th {{ padding: 0.2rem 0.7rem; border-bottom: 1px solid #ddd; text-align: left; }}
pre {{ background: #f6f6f6; padding: 1rem; overflow-x: auto; font-size: 0.8rem; }}
</style></head><body>
<h1>XMAS selection report</h1>
<p>{summary}</p>
<p>{models}</p>
<h2>Subsets</h2>{subsets}
<h2>What was selected</h2>{figures}
{coherence}
{evaluation}
<h2>What selection cost</h2>
<p>Per stage, the jobs' wall, CPU and GPU seconds (from logs/stats); per method, the stages its selection needs
and its own sampling{reference}.</p>{stage_costs}{method_costs}
<h2>Run</h2>
<h3>Records excluded by prepare, by reason</h3>{exclusions}
<h3>Counts per stage</h3>{stages}
<h3>Versions</h3>{versions}
<h3>Configuration</h3><pre>{config}</pre>
</body></html>
"""


def build(inputs: dict, subsets: list[Subset], run_config: dict, stats: StageStats) -> str:
    examples = read_parquet(inputs["examples"])
    clusters = read_parquet(inputs["clusters"])
    trajectories = read_parquet(inputs["trajectories"])
    usable = examples[examples.status == "ok"]
    figures = [
        trajectory_curves(trajectories, clusters),
        stability_distribution(subsets),
        cluster_quotas(clusters, subsets),
        composition(usable.set_index("index").source, subsets, "source"),
    ]
    types = question_types(inputs["annotations"], usable)
    if types is not None:
        figures.append(composition(types, subsets, "question type"))
    evaluation = ""
    if inputs.get("eval_summary"):
        summary = pd.read_csv(inputs["eval_summary"], sep="\t")
        figures_eval = arp_curves(summary)
        comparison = comparison_table(summary)
        evaluation = (
            f"<h2>Evaluation</h2>{figures_eval.html()}<h3>ARP and score per benchmark</h3>"
            f"<p>Mean ± standard deviation over the seeds of each method and budget.</p>"
            f"{table_html(comparison)}"
        )
        stats.add("figures", 1)
    exclusions = examples.reason.value_counts().rename_axis("reason").reset_index(name="records")
    stats.add("figures", len(figures))
    stats.add("subsets", len(subsets))
    return PAGE.format(
        summary=html.escape(
            f"{len(examples)} source records, {len(usable)} usable "
            f"({int(usable.has_image.sum())} with an image), {clusters.cluster.max() + 1} clusters."
        ),
        models=html.escape(
            models_text(run_config, list(dict.fromkeys(subset.method for subset in subsets)), inputs["stats_dir"])
        ),
        subsets=table_html(subset_table(subsets, len(usable))),
        figures="\n".join(figure.html() for figure in figures),
        evaluation=evaluation,
        coherence=coherence_section(read_json(inputs["coherence"])) if inputs.get("coherence") else "",
        exclusions=table_html(exclusions) if len(exclusions) else "<p>none</p>",
        **cost_tables(inputs["stats_dir"], list(dict.fromkeys(subset.method for subset in subsets))),
        stages=table_html(stage_counts(inputs["stats_dir"])) if inputs["stats_dir"].is_dir() else "<p>no stats</p>",
        versions=table_html(versions()),
        config=html.escape(json.dumps(run_config, indent=2, sort_keys=True), quote=False),
    )


# Where checkpoint 0 of each model records what it is (xmas.models.presets.init_model), under logs/stats.
MODEL_STATS = {"proxy": "proxy/checkpoint-0.json", "target": "target/base.json"}


def models_text(run_config: dict, methods: list[str], stats_dir: Path) -> str:
    """Which models selected the data, and for which: the proxy and the target, each with its family, size and
    the settings that shaped its inputs; and the feature methods' reference."""
    parts = []
    for role, trained in (("Proxy", ", trained on these records"), ("Target", "")):
        given = run_config.get(role.lower(), {}).get("model", "?")
        path = stats_dir / MODEL_STATS[role.lower()]
        described = model_description(read_json(path)) if path.is_file() else given
        parts.append(f"{role}: {described}{trained}.")
    text = " ".join(parts)
    feature_methods = [method for method in methods if METHODS[method].features]
    if feature_methods:
        reference = run_config.get("features", {}).get("reference", "proxy")
        which = (
            "the proxy's last checkpoint, trained on these records (COINCIDE's authors use a model trained "
            "elsewhere, TinyLLaVA-2.0B)"
            if reference == "proxy"
            else f"{reference}, as given (not trained on these records)"
        )
        text += f" Reference VLM of {', '.join(feature_methods)}: {which}."
    return text


def model_description(stats: dict) -> str:
    """A checkpoint 0 from its stats: "qwen2.5-vl-3b (qwen2_5_vl, 3.75B parameters; its own chat template, images
    native, 12544 to 451584 pixels, 16 to 576 image tokens, max_length 2048)"."""
    encoding, parameters = stats.get("encoding", {}), stats.get("parameters", 0)
    size = f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M"
    conversation = encoding.get("conversation")
    shaped = [
        "its own chat template" if conversation == "model" else f"conversation {conversation}",
        f"images {encoding.get('image_preprocessing')}",
        *(f"{name} {value}" for name, value in encoding.items() if name in PIXEL_BOUNDS),
        "{fewest} to {most} image tokens".format(**encoding["image_tokens"]) if "image_tokens" in encoding else "",
        f"max_length {encoding.get('max_length')}",
    ]
    return (
        f"{stats.get('model', '?')} ({stats.get('family', '?')}, {size} parameters; {', '.join(filter(None, shaped))})"
    )


PIXEL_BOUNDS = ("min_pixels", "max_pixels", "min_patches", "max_patches")


def question_types(source: Source | Path, usable: pd.DataFrame) -> pd.Series | None:
    """The demo's ``question_type`` field by source index, for analysis only (selection never reads it).

    Real datasets have no such field: the first record tells, so their records are not all read.
    """
    with as_source(source).reader(usable) as records:
        if not len(records) or "question_type" not in records[0]:
            return None
        types = pd.Series([record.get("question_type") for record in records], index=usable["index"], dtype=object)
    return types if types.notna().all() else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_input_arguments(parser, "examples", "annotations")
    parser.add_argument("--clusters", required=True, type=Path, help="clusters.parquet from `xmas cluster`")
    parser.add_argument("--trajectories", required=True, type=Path, help="merged trajectories parquet")
    parser.add_argument(
        "--manifest",
        nargs=3,
        action="append",
        required=True,
        metavar=("METHOD", "BUDGET", "PATH"),
        help="a subset manifest to show; repeat for every method and budget",
    )
    parser.add_argument("--eval-summary", type=Path, help="results/eval/summary.tsv, when evaluation has run")
    parser.add_argument("--coherence", type=Path, help="results/selection/coherence.json (`xmas coherence`)")
    parser.add_argument("--stats-dir", type=Path, default=Path("logs/stats"), help="the stages' stats JSON files")
    parser.add_argument("--run-config", default="{}", help="the workflow config as JSON, shown on the page")
    parser.add_argument("--out", required=True, type=Path, help="HTML page to write")
    add_settings(parser, "report")


def run(args: argparse.Namespace) -> None:
    stats = StageStats("report")
    try:
        run_config = json.loads(args.run_config)
    except json.JSONDecodeError as error:
        raise XmasError(f"--run-config is not valid JSON: {error}") from None
    subsets = [Subset(method, budget, read_parquet(path)) for method, budget, path in args.manifest]
    inputs = {
        "examples": args.examples,
        "annotations": stage_source(args.annotations, settings_of(args, "report")),
        "clusters": args.clusters,
        "trajectories": args.trajectories,
        "eval_summary": args.eval_summary,
        "coherence": args.coherence,
        "stats_dir": args.stats_dir,
    }
    page = build(inputs, subsets, run_config, stats)
    with atomic_path(args.out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    stats.finish(args.stats)
