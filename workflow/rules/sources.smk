# Where the data comes from, and the target's alignment captions. Every name is defined whatever
# the config says (None or [] where it does not apply).
# Where the data comes from, by precedence: a dataset to download (dataset.download), your own
# files (dataset.annotations), else a generated dataset (dataset.demo).
DOWNLOAD = DATASET.get("download")
GENERATED = DOWNLOAD is None and "annotations" not in DATASET
# A shipped generator by name, else the user's settings file.
DEMO_SETTINGS = str(settings_file(DATASET["demo"]))

DOWNLOAD_MANIFEST = DOWNLOAD_REPORT = DATA_FOLDER = None
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
    IMAGE_ROOT = DATASET.get("image_root")
    IMAGE_INPUT = []
    if "entry" in DATASET:
        # A LLaMA-Factory dataset_info.json: its entry names the data file, its columns and tags, and (its
        # folder) the image root; what the config sets wins.
        try:
            _entry = llamafactory_entry(ANNOTATIONS, DATASET["entry"])
        except XmasError as error:
            raise WorkflowError(f"config dataset.entry: {error}")
        ANNOTATIONS, IMAGE_ROOT = _entry.annotations, IMAGE_ROOT or _entry.media_dir
        if DATASET["format"] == "auto":
            DATASET["format"] = _entry.format
        DATASET["columns"] = {**_entry.columns, **DATASET["columns"]}
        DATASET["tags"] = {**_entry.tags, **DATASET["tags"]}

# The records' files (what jobs wait on) and the suffix their subsets keep: known once the data is there.
ANNOTATION_FILES, SUBSET_SUFFIX = [ANNOTATIONS], ".json"
if DOWNLOAD is None and not GENERATED:
    try:
        _source = open_source(ANNOTATIONS, DATASET["format"], DATASET["columns"], DATASET["tags"])
    except XmasError as error:
        raise WorkflowError(f"config dataset.annotations: {error}")
    ANNOTATION_FILES, SUBSET_SUFFIX = [str(file) for file in _source.files], _source.suffix
    # A subset keeps its source's format: the README's `results/subset_0.5.json` asked of other data is
    # answered here, rather than by Snakemake's "no rule to produce".
    _other = [word for word in sys.argv[1:] if re.fullmatch(r"(.*/)?subset_[^/]+\.json", word)]
    if SUBSET_SUFFIX != ".json" and _other:
        raise WorkflowError(
            f"{_other[0]}: the data ({ANNOTATIONS}) is {_source.description}, and its subsets keep its format: "
            f"ask for {_other[0].removesuffix('.json')}{SUBSET_SUFFIX}"
        )
# Options of the stages that read the records, quoted (a glob of shards stays one argument).
ANNOTATIONS_OPTION = f"--annotations {shlex.quote(ANNOTATIONS)}"
IMAGE_ROOT_OPTION = f"--image-root {shlex.quote(IMAGE_ROOT)}" if IMAGE_ROOT else ""

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
else:
    ALIGN_IMAGE_ROOT, ALIGN_IMAGE_INPUT = None, []
