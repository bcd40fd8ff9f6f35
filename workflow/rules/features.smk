# The feature methods (COINCIDE, SemDeDup): a reference VLM's features of the usable image records, one job
# per shard (resumable, as the trajectory jobs), then spherical k-means per method, under
# results/<method>/selection/. The reference is features.reference: the proxy's last checkpoint by default,
# else composed from a preset, folder or Hub id as the proxy's checkpoint 0 is.

if FEATURE_METHODS_USED and FEATURES["reference"] != "proxy":

    use rule proxy_init as reference_init with:
        input:
            annotations=ANNOTATION_FILES,
            models=local_copies(FEATURES["reference"], PROXY_PRESETS),
        output:
            directory(REFERENCE),
        log:
            log="logs/reference.log",
            stats="logs/stats/reference.json",
        params:
            options=f"{flags('proxy-init')} --model {FEATURES['reference']}",


if FEATURE_METHODS_USED:

    rule features:
        input:
            model=reference_model,
            examples=EXAMPLES,
            annotations=ANNOTATION_FILES,
            images=IMAGE_INPUT,
        output:
            "results/features/shard-{shard}.parquet",
        log:
            log="logs/features/shard-{shard}.log",
            stats="logs/stats/features/shard-{shard}.json",
        threads: THREADS["features"]
        resources:
            **job("features"),
        params:
            annotations=ANNOTATIONS_OPTION,
            image_root=IMAGE_ROOT_OPTION,
            options=flags("features"),
        shell:
            "xmas features --model {input.model} --shard {wildcards.shard} --examples {input.examples}"
            " {params.annotations} {params.image_root} --out {output} {params.options} --threads {threads}"
            " --stats {log.stats} 2> {log.log}"

    rule cluster_features:
        input:
            shards=[f"results/features/shard-{shard}.parquet" for shard in range(FEATURES["shards"])],
            examples=EXAMPLES,
        output:
            clusters="results/{method}/selection/clusters.parquet",
            centroids="results/{method}/selection/centroids.parquet",
            features="results/{method}/selection/features.npy",
        log:
            log="logs/{method}/cluster.log",
            stats="logs/stats/{method}/cluster.json",
        wildcard_constraints:
            method="|".join(FEATURE_METHODS_USED),
        threads: THREADS["cluster_features"]
        resources:
            **job("cluster_features"),
        params:
            options=flags("cluster-features"),
        shell:
            "xmas cluster-features {input.shards} --method {wildcards.method} --examples {input.examples}"
            " --out {output.clusters} --centroids {output.centroids} --features {output.features} {params.options}"
            " --threads {threads} --stats {log.stats} 2> {log.log}"
