# Selection: clusters and stability, then a subset per method, budget and seed, every one at
# results/{method}/seed-{seed}/subset_{budget}.json (.jsonl or .parquet: the source's format) with its
# manifest: xmas; loss (clusters of loss trajectories); cluster-random (XMAS clusters, random inside);
# random; full (every usable record, the reference of the evaluation). results/subset_{budget}.json is
# XMAS's subset of selection.seed.


rule cluster:
    input:
        examples=EXAMPLES,
        trajectories="results/trajectories.parquet",
    output:
        CLUSTERS,
    log:
        log="logs/cluster.log",
        stats="logs/stats/cluster.json",
    resources:
        **job("cluster"),
    params:
        options=flags("cluster"),
    shell:
        "xmas cluster --examples {input.examples} --trajectories {input.trajectories} --out {output}"
        " {params.options} --stats {log.stats} 2> {log.log}"


if "loss" in SIGNALS_USED:

    use rule cluster as cluster_loss with:
        input:
            examples=EXAMPLES,
            trajectories="results/loss/trajectories.parquet",
        output:
            clusters_of("loss"),
        log:
            log="logs/loss/cluster.log",
            stats="logs/stats/loss/cluster.json",


if COHERENCE_FILE:

    rule coherence:
        input:
            model=lambda w: checkpoint_dir(proxy_checkpoints()),
            examples=EXAMPLES,
            annotations=ANNOTATION_FILES,
            images=IMAGE_INPUT,
            clusters=CLUSTERS,
        output:
            COHERENCE_FILE,
        log:
            log="logs/coherence.log",
            stats="logs/stats/coherence.json",
        threads: THREADS["coherence"]
        resources:
            **job("coherence"),
        params:
            annotations=ANNOTATIONS_OPTION,
            image_root=IMAGE_ROOT_OPTION,
            options=flags("coherence"),
        shell:
            "xmas coherence --model {input.model} --examples {input.examples} {params.annotations}"
            " {params.image_root} --clusters {input.clusters} --out {output} {params.options}"
            " --threads {threads} --stats {log.stats} 2> {log.log}"


rule sample:
    input:
        unpack(lambda w: sample_inputs(w.method)),
    output:
        subset=f"results/{{method}}/seed-{{seed}}/subset_{{budget}}{SUBSET_SUFFIX}",
        manifest="results/{method}/seed-{seed}/subset_{budget}.manifest.parquet",
    log:
        log="logs/sample/{method}/seed-{seed}/{budget}.log",
        stats="logs/stats/sample/{method}/seed-{seed}/{budget}.json",
    resources:
        **job("sample"),
    params:
        annotations=ANNOTATIONS_OPTION,
        clusters=lambda w: clusters_option(w.method),
        options=flags("sample"),
    shell:
        "xmas sample --method {wildcards.method} --budget {wildcards.budget} --seed {wildcards.seed}"
        " --examples {input.examples} {params.annotations} {params.clusters}"
        " --out {output.subset} --manifest {output.manifest} {params.options} --stats {log.stats} 2> {log.log}"


rule main_subset:
    input:
        subset=lambda w: subset_file("xmas", w.budget),
        manifest=lambda w: subset_manifest("xmas", w.budget),
    output:
        subset=f"results/subset_{{budget}}{SUBSET_SUFFIX}",
        manifest="results/subset_{budget}.manifest.parquet",
    log:
        "logs/main_subset/{budget}.log",
    localrule: True
    run:
        copy_sealed(input, output, log[0])


# Every subset as a LLaMA-Factory dataset (`dataset_dir: results/llamafactory`, `dataset: <method>_<budget>`).
rule llamafactory:
    input:
        subsets=all_subsets(),
    output:
        directory("results/llamafactory"),
    log:
        log="logs/llamafactory.log",
        stats="logs/stats/llamafactory.json",
    resources:
        **job("llamafactory"),
    params:
        subsets=" ".join(
            f"--subset {method}_{budget} {subset_file(method, budget)}" for method, budget in methods_and_budgets()
        ),
        image_root=IMAGE_ROOT_OPTION,
        options=flags("llamafactory"),
    shell:
        "xmas llamafactory {params.subsets} {params.image_root} --out {output} {params.options}"
        " --stats {log.stats} 2> {log.log}"
