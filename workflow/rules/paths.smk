# Where outputs go, and the wildcards' forms.

TARGET_BASE = "results/target/base"
TARGET_ALIGNED = "results/target/aligned"
EXAMPLES = "results/data/examples.parquet"
CLUSTERS = "results/selection/clusters.parquet"
# The gradient-coherence diagnostic, when coherence.enabled says so (auto: on generated data only).
COHERENCE_ON = COHERENCE["enabled"] is True or (COHERENCE["enabled"] == "auto" and GENERATED)
COHERENCE_FILE = "results/selection/coherence.json" if COHERENCE_ON else None
SELECTION_METHODS = SELECTION["methods"]
# The signals whose trajectories the selected methods sample from (their rules exist only then).
SIGNALS_USED = {METHODS[method].signal for method in SELECTION_METHODS} - {None}
# The selected methods that select by a reference VLM's features (their rules exist only then).
FEATURE_METHODS_USED = [method for method in SELECTION_METHODS if METHODS[method].features]
REFERENCE = "results/reference"  # the feature methods' reference VLM, unless it is the proxy
# The reference every subset is measured against: all usable records, trained and evaluated alike.
FULL = ("full", "1")
PROXY_PRESETS = PROXY["presets"] or str(resource("proxy_presets.yaml"))
TARGET_PRESETS = TARGET["presets"] or str(resource("target_presets.yaml"))
STANDINS = "results/standins"
# Offline stand-ins of Hub models (config model_paths of the rehearsals), written by the standin_model rule.
USES_STANDINS = any(path.startswith(STANDINS) for path in MODEL_PATHS.values())
EVAL_SUMMARY = "results/eval/summary.tsv"
SHARDS = TRAJECTORY["shards"]


wildcard_constraints:
    budget=r"(0?\.\d*[1-9]\d*|1(\.0*)?)",
    checkpoint=r"[1-9]\d*",
    shard=r"\d+",
    seed=r"\d+",
    method=r"[a-z][a-z-]*",


def checkpoint_dir(c):
    return f"results/proxy/checkpoint-{c}"


def methods_and_budgets():
    return [(method, budget) for method in SELECTION_METHODS for budget in SELECTION["budgets"]]


def subset_stem(method, budget, seed=None):
    """results/{method}/seed-{seed}/subset_{budget}. Only seeded baselines draw one subset per
    evaluation seed; the others are fixed by selection.seed."""
    seed = seed if METHODS[method].seeded and seed is not None else SELECTION["seed"]
    return f"results/{method}/seed-{seed}/subset_{budget}"


def subset_file(method, budget, seed=None):
    """The subset, in the source's format (.json, .jsonl or .parquet: SUBSET_SUFFIX)."""
    return f"{subset_stem(method, budget, seed)}{SUBSET_SUFFIX}"


def subset_manifest(method, budget):
    return subset_stem(method, budget) + ".manifest.parquet"


def all_subsets():
    return [subset_file(method, budget) for method, budget in methods_and_budgets()]


def signal_folder(signal):
    """Where a signal's trajectories and clusters go: results/ for XMAS's attention, results/<signal>/ else."""
    return f"results/{signal_prefix(signal)}".rstrip("/")


def clusters_of(method):
    """The clusters a method samples from (xmas.methods: those of its signal's trajectories, or of its
    features), else None."""
    declared = METHODS[method]
    if declared.features:
        return f"results/{method}/selection/clusters.parquet"
    return None if declared.signal is None else f"{signal_folder(declared.signal)}/selection/clusters.parquet"


def centroids_of(method):
    """The centroids a feature method's rule reads, else None."""
    return f"results/{method}/selection/centroids.parquet" if METHODS[method].features else None


def features_of(method):
    """The image records' features a feature method's rule reads, else None."""
    return f"results/{method}/selection/features.npy" if METHODS[method].features else None


def target_dir(method, budget, seed):
    return f"results/target/{method}/{budget}/seed-{seed}"


def scores_tsv(method, budget, seed):
    return f"results/eval/runs/{method}/{budget}/seed-{seed}.tsv"
