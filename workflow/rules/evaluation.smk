# Evaluation: the target fine-tuned on every subset (and on the full set, the reference), per
# seed, then scored; results/eval/summary.tsv compares them by ARP.


rule target_init:
    input:
        annotations=ANNOTATION_FILES,
        captions=[] if ALIGN_CAPTIONS is None else [ALIGN_CAPTIONS],
        models=local_copies(TARGET["model"], TARGET_PRESETS),
    output:
        directory(TARGET_BASE),
    log:
        log="logs/target/base.log",
        stats="logs/stats/target/base.json",
    resources:
        **job("target_init"),
    params:
        options=flags("target-init"),
    shell:
        "xmas target-init --annotations {input.annotations} {input.captions} --out {output} {params.options}"
        " --stats {log.stats} 2> {log.log}"


if ALIGN_CAPTIONS is not None:

    rule pretrain_target:
        input:
            base=TARGET_BASE,
            captions=ALIGN_CAPTIONS,
            images=ALIGN_IMAGE_INPUT,
        output:
            directory(TARGET_ALIGNED),
        log:
            log="logs/target/aligned.log",
            stats="logs/stats/target/aligned.json",
        threads: THREADS["pretrain_target"]
        resources:
            **job("pretrain_target"),
        params:
            image_root=ALIGN_IMAGE_ROOT,
            launch=launcher(TARGET),
            options=flags("pretrain-target"),
        shell:
            "{params.launch} pretrain-target --base {input.base} --captions {input.captions}"
            " --image-root {params.image_root} --out {output} {params.options} --threads {threads}"
            " --stats {log.stats} 2> {log.log}"


rule finetune_target:
    input:
        base=target_start,
        subset=lambda w: subset_file(w.method, w.budget, w.seed),
        images=IMAGE_INPUT,
    output:
        directory(target_dir("{method}", "{budget}", "{seed}")),
    log:
        log="logs/target/{method}/{budget}/seed-{seed}.log",
        stats="logs/stats/target/{method}/{budget}/seed-{seed}.json",
    threads: THREADS["finetune_target"]
    resources:
        **job("finetune_target"),
    params:
        image_root=IMAGE_ROOT_OPTION,
        launch=launcher(TARGET),
        options=flags("finetune-target"),
    shell:
        "{params.launch} finetune-target --base {input.base} --subset {input.subset} {params.image_root}"
        " --out {output} --seed {wildcards.seed} {params.options} --threads {threads}"
        " --stats {log.stats} 2> {log.log}"


rule evaluate:
    input:
        unpack(lambda w: evaluation_inputs(w.method, w.budget, w.seed)),
    output:
        scores_tsv("{method}", "{budget}", "{seed}"),
    log:
        log="logs/eval/{method}/{budget}/seed-{seed}.log",
        stats="logs/stats/eval/{method}/{budget}/seed-{seed}.json",
    threads: THREADS["evaluate"]
    resources:
        **job("evaluate"),
    params:
        test=lambda w, input: test_options(input),
        options=flags("evaluate"),
    shell:
        "xmas evaluate --model {input.model} {params.test} {params.options} --out {output} --threads {threads}"
        " --stats {log.stats} 2> {log.log}"


rule summarize:
    input:
        [scores_tsv(*run) for run in evaluation_runs()],
    output:
        summary=EVAL_SUMMARY,
        table="results/eval/summary.txt",
    log:
        log="logs/eval/summary.log",
        stats="logs/stats/eval/summary.json",
    resources:
        **job("summarize"),
    params:
        runs=" ".join(
            f"--run {method} {budget} {seed} {scores_tsv(method, budget, seed)}"
            for method, budget, seed in evaluation_runs()
        ),
    shell:
        "xmas summarize {params.runs} --out {output.summary} --table {output.table} --stats {log.stats} 2> {log.log}"
        " && cat {output.table}"
