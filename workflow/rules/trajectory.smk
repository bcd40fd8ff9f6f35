# Trajectories: one job per (checkpoint, shard), then a merge that checks completeness. The loss
# baseline runs the same jobs with each example's training loss as the signal, under results/loss/.


rule trajectory:
    input:
        model=checkpoint_dir("{checkpoint}"),
        examples=EXAMPLES,
        annotations=ANNOTATIONS,
        images=IMAGE_INPUT,
    output:
        "results/trajectories/checkpoint-{checkpoint}/shard-{shard}.parquet",
    params:
        image_root=IMAGE_ROOT,
        shards=SHARDS,
        options=flags(TRAJECTORY, "top_k", "layers", "head_reduce", "layer_reduce", "batch_size",
                      "chunk_size", "dtype", "group_by_length", "attn_implementation"),
    threads: TRAJECTORY["threads"]
    resources:
        gpu=TRAJECTORY["gpus"],
    log:
        log="logs/trajectories/checkpoint-{checkpoint}/shard-{shard}.log",
        stats="logs/stats/trajectories/checkpoint-{checkpoint}/shard-{shard}.json",
    shell:
        "xmas trajectory --model {input.model} --checkpoint {wildcards.checkpoint} --shard {wildcards.shard}"
        " --shards {params.shards} --examples {input.examples} --annotations {input.annotations}"
        " --image-root {params.image_root} --out {output} {params.options} --threads {threads}"
        " --stats {log.stats} 2> {log.log}"


use rule trajectory as trajectory_loss with:
    output:
        "results/loss/trajectories/checkpoint-{checkpoint}/shard-{shard}.parquet",
    params:
        image_root=IMAGE_ROOT,
        shards=SHARDS,
        options="--signal loss " + flags(TRAJECTORY, "batch_size", "chunk_size", "dtype", "group_by_length",
                                         "attn_implementation"),
    log:
        log="logs/loss/trajectories/checkpoint-{checkpoint}/shard-{shard}.log",
        stats="logs/stats/loss/trajectories/checkpoint-{checkpoint}/shard-{shard}.json",


rule merge:
    input:
        shards=expand(
            "results/trajectories/checkpoint-{checkpoint}/shard-{shard}.parquet",
            checkpoint=range(1, CHECKPOINTS + 1),
            shard=range(SHARDS),
        ),
        examples=EXAMPLES,
    output:
        "results/trajectories.parquet",
    params:
        checkpoints=CHECKPOINTS,
        shards=SHARDS,
    log:
        log="logs/merge.log",
        stats="logs/stats/merge.json",
    shell:
        "xmas merge {input.shards} --examples {input.examples} --checkpoints {params.checkpoints}"
        " --shards {params.shards} --out {output} --stats {log.stats} 2> {log.log}"


use rule merge as merge_loss with:
    input:
        shards=expand(
            "results/loss/trajectories/checkpoint-{checkpoint}/shard-{shard}.parquet",
            checkpoint=range(1, CHECKPOINTS + 1),
            shard=range(SHARDS),
        ),
        examples=EXAMPLES,
    output:
        "results/loss/trajectories.parquet",
    log:
        log="logs/loss/merge.log",
        stats="logs/stats/loss/merge.json",
