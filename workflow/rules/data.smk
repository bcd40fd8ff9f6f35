# Data: a real dataset downloaded (dataset.download) or a generated one (dataset.demo), then
# validation into results/data/examples.parquet (against the proxy's checkpoint 0, whose tokenizer,
# chat template and image tokens decide whether a record fits).


if DOWNLOAD is not None:

    rule download:
        output:
            annotations=ANNOTATIONS,
            report=DOWNLOAD_REPORT,
        log:
            log="logs/download.log",
            stats="logs/stats/download.json",
        # Compute nodes of many clusters have no internet access; the submit host usually has.
        localrule: True
        params:
            manifest=DOWNLOAD_MANIFEST,
            dest=DATA_FOLDER,
        shell:
            "xmas download --dataset {params.manifest} --dest {params.dest} --report {output.report}"
            " --stats {log.stats} 2> {log.log}"


if GENERATED:

    rule demo_data:
        input:
            settings=DEMO_SETTINGS,
        output:
            train="results/demo/train.json",
            test="results/demo/test.json",
            images=directory("results/demo/images"),
            captions=[] if ALIGN_CAPTIONS != "results/demo/captions.json" else ["results/demo/captions.json"],
        log:
            log="logs/demo_data.log",
            stats="logs/stats/demo_data.json",
        resources:
            **job("demo_data"),
        params:
            captions=lambda w, output: f"--captions-json {output.captions}" if output.captions else "",
        shell:
            "xmas demo-data --settings {input.settings} --train-json {output.train} --test-json {output.test}"
            " --image-root {output.images} {params.captions} --stats {log.stats} 2> {log.log}"


# A checkpoint: with training.save_every_steps, how many proxy checkpoints there are depends on how many
# records it finds usable (proxy_checkpoints()).
checkpoint prepare:
    input:
        annotations=ANNOTATION_FILES,
        images=IMAGE_INPUT,
        model=checkpoint_dir(0),
    output:
        EXAMPLES,
    log:
        log="logs/prepare.log",
        stats="logs/stats/prepare.json",
    threads: THREADS["prepare"]
    resources:
        **job("prepare"),
    params:
        annotations=ANNOTATIONS_OPTION,
        image_root=IMAGE_ROOT_OPTION,
        options=flags("prepare"),
    shell:
        "xmas prepare {params.annotations} {params.image_root} --model {input.model}"
        " --out {output} {params.options} --workers {threads} --stats {log.stats} 2> {log.log}"
