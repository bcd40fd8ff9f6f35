# Selection: clusters and stability, then a subset per budget for XMAS and each baseline:
# loss (clusters of loss trajectories), cluster-random (XMAS clusters, random inside), random,
# and full (every usable record: the reference of the evaluation).


def clusters_of(method):
    return "results/loss/selection/clusters.parquet" if method == "loss" else "results/selection/clusters.parquet"


rule cluster:
    input:
        examples=EXAMPLES,
        trajectories="results/trajectories.parquet",
    output:
        "results/selection/clusters.parquet",
    params:
        options=flags(SELECTION, "clusters", "feature", "seed", "min_cluster_size"),
        iterations=SELECTION["kmeans_iterations"],
    log:
        log="logs/cluster.log",
        stats="logs/stats/cluster.json",
    shell:
        "xmas cluster --examples {input.examples} --trajectories {input.trajectories} --out {output}"
        " {params.options} --iterations {params.iterations} --stats {log.stats} 2> {log.log}"


use rule cluster as cluster_loss with:
    input:
        examples=EXAMPLES,
        trajectories="results/loss/trajectories.parquet",
    output:
        "results/loss/selection/clusters.parquet",
    params:
        # One loss per checkpoint: the feature is the loss itself.
        options=flags(SELECTION, "clusters", "seed", "min_cluster_size"),
        iterations=SELECTION["kmeans_iterations"],
    log:
        log="logs/loss/cluster.log",
        stats="logs/stats/loss/cluster.json",


rule sample_xmas:
    input:
        examples=EXAMPLES,
        clusters="results/selection/clusters.parquet",
        annotations=ANNOTATIONS,
    output:
        subset="results/subset_{budget}.json",
        manifest="results/subset_{budget}.manifest.parquet",
    params:
        method="xmas",
        options=flags(SELECTION, "min_cluster_size", "seed"),
    log:
        log="logs/sample/xmas_{budget}.log",
        stats="logs/stats/sample/xmas_{budget}.json",
    shell:
        "xmas sample --method {params.method} --budget {wildcards.budget} --examples {input.examples}"
        " --clusters {input.clusters} --annotations {input.annotations} --out {output.subset}"
        " --manifest {output.manifest} {params.options} --stats {log.stats} 2> {log.log}"


use rule sample_xmas as sample_clustered_baseline with:
    input:
        examples=EXAMPLES,
        clusters=lambda w: clusters_of(w.method),
        annotations=ANNOTATIONS,
    output:
        subset="results/{method}/subset_{budget}.json",
        manifest="results/{method}/subset_{budget}.manifest.parquet",
    wildcard_constraints:
        method="loss|cluster-random",
    params:
        method=lambda w: w.method,
        options=flags(SELECTION, "min_cluster_size", "seed"),
    log:
        log="logs/sample/{method}_{budget}.log",
        stats="logs/stats/sample/{method}_{budget}.json",


use rule sample_xmas as sample_cluster_random_seed with:
    output:
        subset="results/cluster-random/seed-{seed}/subset_{budget}.json",
        manifest="results/cluster-random/seed-{seed}/subset_{budget}.manifest.parquet",
    params:
        method="cluster-random",
        options=lambda w: f"{flags(SELECTION, 'min_cluster_size')} --seed {w.seed}",
    log:
        log="logs/sample/cluster-random_{budget}_seed-{seed}.log",
        stats="logs/stats/sample/cluster-random_{budget}_seed-{seed}.json",


rule sample_unclustered:
    input:
        examples=EXAMPLES,
        annotations=ANNOTATIONS,
    output:
        subset="results/{method}/subset_{budget}.json",
        manifest="results/{method}/subset_{budget}.manifest.parquet",
    wildcard_constraints:
        method="random|full",
    params:
        method=lambda w: w.method,
        seed=SELECTION["seed"],
    log:
        log="logs/sample/{method}_{budget}.log",
        stats="logs/stats/sample/{method}_{budget}.json",
    shell:
        "xmas sample --method {params.method} --budget {wildcards.budget} --examples {input.examples}"
        " --annotations {input.annotations} --out {output.subset} --manifest {output.manifest}"
        " --seed {params.seed} --stats {log.stats} 2> {log.log}"


use rule sample_unclustered as sample_random_seed with:
    output:
        subset="results/random/seed-{seed}/subset_{budget}.json",
        manifest="results/random/seed-{seed}/subset_{budget}.manifest.parquet",
    params:
        method="random",
        seed=lambda w: w.seed,
    log:
        log="logs/sample/random_{budget}_seed-{seed}.log",
        stats="logs/stats/sample/random_{budget}_seed-{seed}.json",
