# The rules' input functions and the options that depend on their inputs.


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


def sample_inputs(method):
    if method not in METHODS:
        raise ValueError(f"no selection method {method!r}; xmas has {', '.join(METHODS)}")
    signal = METHODS[method].signal
    if signal is not None and signal not in SIGNALS_USED:
        raise ValueError(
            f"method {method!r} samples from the {signal} signal's clusters, which this run builds only when "
            f"selection.methods lists such a method (it lists {', '.join(SELECTION_METHODS)}): add {method!r} to it"
        )
    inputs = {"examples": EXAMPLES, "annotations": ANNOTATION_FILES}
    if clusters_of(method):
        inputs["clusters"] = clusters_of(method)
    if centroids_of(method):
        inputs.update(centroids=centroids_of(method), features=features_of(method))
    return inputs


def clusters_option(method):
    options = f"--clusters {clusters_of(method)}" if clusters_of(method) else ""
    if centroids_of(method):
        options += f" --centroids {centroids_of(method)} --features {features_of(method)}"
    return options


def reference_model(wildcards):
    """The reference VLM of the feature methods: the proxy's last checkpoint, or the one composed from the
    preset, folder or Hub id features.reference names (rule reference_init)."""
    return checkpoint_dir(proxy_checkpoints()) if FEATURES["reference"] == "proxy" else REFERENCE


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
