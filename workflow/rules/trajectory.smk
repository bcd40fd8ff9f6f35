# Trajectories: one job per (checkpoint, shard), then a merge that checks completeness. The loss
# baseline runs the same jobs with each example's training loss as the signal, under results/loss/.


rule trajectory:
    input:
        model=checkpoint_dir("{checkpoint}"),
        examples=EXAMPLES,
        annotations=ANNOTATION_FILES,
        images=IMAGE_INPUT,
    output:
        "results/trajectories/checkpoint-{checkpoint}/shard-{shard}.parquet",
    log:
        log="logs/trajectories/checkpoint-{checkpoint}/shard-{shard}.log",
        stats="logs/stats/trajectories/checkpoint-{checkpoint}/shard-{shard}.json",
    threads: THREADS["trajectory"]
    resources:
        **job("trajectory"),
    params:
        annotations=ANNOTATIONS_OPTION,
        image_root=IMAGE_ROOT_OPTION,
        signal="attention",
        options=flags("trajectory"),
    shell:
        "xmas trajectory --model {input.model} --checkpoint {wildcards.checkpoint} --shard {wildcards.shard}"
        " --examples {input.examples} {params.annotations} {params.image_root}"
        " --out {output} --signal {params.signal} {params.options} --threads {threads}"
        " --stats {log.stats} 2> {log.log}"


if "loss" in SIGNALS_USED:

    use rule trajectory as trajectory_loss with:
        output:
            "results/loss/trajectories/checkpoint-{checkpoint}/shard-{shard}.parquet",
        log:
            log="logs/loss/trajectories/checkpoint-{checkpoint}/shard-{shard}.log",
            stats="logs/stats/loss/trajectories/checkpoint-{checkpoint}/shard-{shard}.json",
        params:
            annotations=ANNOTATIONS_OPTION,
            image_root=IMAGE_ROOT_OPTION,
            signal="loss",
            options=flags("trajectory"),


rule merge:
    input:
        shards=lambda w: trajectory_shards("results/trajectories"),
        examples=EXAMPLES,
    output:
        "results/trajectories.parquet",
    log:
        log="logs/merge.log",
        stats="logs/stats/merge.json",
    resources:
        **job("merge"),
    params:
        options=flags("merge"),
    shell:
        "xmas merge {input.shards} --examples {input.examples} {params.options} --out {output}"
        " --stats {log.stats} 2> {log.log}"


if "loss" in SIGNALS_USED:

    use rule merge as merge_loss with:
        input:
            shards=lambda w: trajectory_shards("results/loss/trajectories"),
            examples=EXAMPLES,
        output:
            "results/loss/trajectories.parquet",
        log:
            log="logs/loss/merge.log",
            stats="logs/stats/loss/merge.json",
