# The proxy: checkpoint 0 from a preset or model, then a chain of training segments 1..C. Each
# segment resumes from the previous checkpoint, so trajectory jobs of checkpoint c can start
# while segment c+1 trains. Stand-ins of real models (config model_paths of the rehearsal) are
# written here too.


if USES_STANDINS:

    rule standin_model:
        output:
            directory(f"{STANDINS}/{{name}}"),
        log:
            log="logs/standins/{name}.log",
            stats="logs/stats/standins/{name}.json",
        resources:
            **job("standin_model"),
        shell:
            "xmas standin-model --name {wildcards.name} --out {output} --stats {log.stats} 2> {log.log}"


rule proxy_init:
    input:
        annotations=ANNOTATION_FILES,
        models=local_copies(PROXY["model"], PROXY_PRESETS),
    output:
        directory(checkpoint_dir(0)),
    log:
        log="logs/proxy/checkpoint-0.log",
        stats="logs/stats/proxy/checkpoint-0.json",
    resources:
        **job("proxy_init"),
    params:
        options=flags("proxy-init"),
    shell:
        "xmas proxy-init --annotations {input.annotations} --out {output} {params.options}"
        " --stats {log.stats} 2> {log.log}"


rule train_segment:
    input:
        previous=lambda w: checkpoint_dir(int(w.checkpoint) - 1),
        examples=EXAMPLES,
        annotations=ANNOTATION_FILES,
        images=IMAGE_INPUT,
    output:
        directory(checkpoint_dir("{checkpoint}")),
    log:
        log="logs/proxy/checkpoint-{checkpoint}.log",
        stats="logs/stats/proxy/checkpoint-{checkpoint}.json",
    threads: THREADS["train_segment"]
    resources:
        **job("train_segment"),
    params:
        annotations=ANNOTATIONS_OPTION,
        image_root=IMAGE_ROOT_OPTION,
        options=flags("train-segment"),
        launch=launcher(TRAINING),
    shell:
        "{params.launch} train-segment --checkpoint {wildcards.checkpoint} --previous {input.previous}"
        " --out {output} --examples {input.examples} {params.annotations}"
        " {params.image_root} {params.options} --threads {threads} --stats {log.stats} 2> {log.log}"
