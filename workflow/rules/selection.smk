# Selection: clusters and stability, then a subset per budget (XMAS and the random baseline).


rule cluster:
    input:
        examples=EXAMPLES,
        trajectories="results/trajectories.parquet",
    output:
        "results/selection/clusters.parquet",
    params:
        options=flags(SELECTION, "clusters", "feature", "seed"),
        iterations=SELECTION["kmeans_iterations"],
    log:
        log="logs/cluster.log",
        stats="logs/stats/cluster.json",
    shell:
        "xmas cluster --examples {input.examples} --trajectories {input.trajectories} --out {output}"
        " {params.options} --iterations {params.iterations} --stats {log.stats} 2> {log.log}"


rule sample_xmas:
    input:
        examples=EXAMPLES,
        clusters="results/selection/clusters.parquet",
        annotations=ANNOTATIONS,
    output:
        subset="results/subset_{budget}.json",
        manifest="results/subset_{budget}.manifest.parquet",
    params:
        options=flags(SELECTION, "min_cluster_size", "seed"),
    log:
        log="logs/sample/xmas_{budget}.log",
        stats="logs/stats/sample/xmas_{budget}.json",
    shell:
        "xmas sample --method xmas --budget {wildcards.budget} --examples {input.examples}"
        " --clusters {input.clusters} --annotations {input.annotations} --out {output.subset}"
        " --manifest {output.manifest} {params.options} --stats {log.stats} 2> {log.log}"


rule sample_random:
    input:
        examples=EXAMPLES,
        annotations=ANNOTATIONS,
    output:
        subset="results/random/subset_{budget}.json",
        manifest="results/random/subset_{budget}.manifest.parquet",
    params:
        seed=SELECTION["seed"],
    log:
        log="logs/sample/random_{budget}.log",
        stats="logs/stats/sample/random_{budget}.json",
    shell:
        "xmas sample --method random --budget {wildcards.budget} --examples {input.examples}"
        " --annotations {input.annotations} --out {output.subset} --manifest {output.manifest}"
        " --seed {params.seed} --stats {log.stats} 2> {log.log}"
