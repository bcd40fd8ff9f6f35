# Evaluation: the target fine-tuned on every subset (and on the full set, the reference), per
# seed, then scored; results/eval/summary.tsv compares them by ARP.


rule target_init:
    input:
        annotations=ANNOTATIONS,
        models=local_copies(TARGET["model"], TARGET_PRESETS),
    output:
        directory(TARGET_BASE),
    params:
        model=TARGET["model"],
        presets=TARGET_PRESETS,
        seed=TARGET["seed"],
        options=init_options(TARGET),
        model_paths=model_path_flags(),
    log:
        log="logs/target/base.log",
        stats="logs/stats/target/base.json",
    shell:
        "xmas proxy-init --model {params.model} --presets {params.presets} --annotations {input.annotations}"
        " --out {output} --seed {params.seed} {params.options} {params.model_paths} --stats {log.stats} 2> {log.log}"


rule finetune_target:
    input:
        base=TARGET_BASE,
        subset=lambda w: subset_json(w.method, w.budget, w.seed),
        images=IMAGE_INPUT,
    output:
        directory(target_dir("{method}", "{budget}", "{seed}")),
    params:
        image_root=IMAGE_ROOT,
        launch=launcher(TARGET["gpus"]),
        options=flags(TARGET, "epochs", "batch_size", "learning_rate", "projector_learning_rate", "weight_decay",
                      "warmup_ratio", "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout",
                      "freeze_vision_tower", "micro_batch_size", "precision", "gradient_checkpointing",
                      "attn_implementation", "deepspeed"),
    threads: TARGET["threads"]
    resources:
        gpu=TARGET["gpus"],
    log:
        log="logs/target/{method}/{budget}/seed-{seed}.log",
        stats="logs/stats/target/{method}/{budget}/seed-{seed}.json",
    shell:
        "{params.launch} finetune --base {input.base} --subset {input.subset} --image-root {params.image_root}"
        " --out {output} --seed {wildcards.seed} {params.options} --threads {threads}"
        " --stats {log.stats} 2> {log.log}"


# The demo suite scores the held-out split of the generated dataset unless evaluation.test names another.
EVALUATION_TEST = EVALUATION.get("test", "results/demo/test.json")
EVALUATION_IMAGE_ROOT = EVALUATION.get("test_image_root", "results/demo/images")


def evaluation_suite_options(wildcards):
    """Checked when an evaluation is in the DAG, so a selection-only run never trips over it."""
    if EVALUATION["suite"] == "demo":
        if not USE_DEMO and "test" not in EVALUATION:
            raise WorkflowError("config evaluation.suite is 'demo' but the data is not the demo: set evaluation.test"
                                " and evaluation.test_image_root (a held-out LLaVA-format file whose records carry"
                                " question_type) or evaluation.suite: lmms-eval")
        return (f"--suite demo --test {EVALUATION_TEST} --image-root {EVALUATION_IMAGE_ROOT}"
                f" {flags(EVALUATION, 'batch_size', 'max_new_tokens')}")
    judge = " --allow-judge" if EVALUATION["allow_judge"] else ""
    return f"--suite lmms-eval {flags(EVALUATION, 'benchmarks', 'batch_size', 'gpus')}{judge}"


rule evaluate:
    input:
        model=target_dir("{method}", "{budget}", "{seed}"),
        test=[EVALUATION_TEST] if EVALUATION["suite"] == "demo" else [],
    output:
        scores_tsv("{method}", "{budget}", "{seed}"),
    params:
        options=evaluation_suite_options,
    threads: EVALUATION["threads"]
    resources:
        gpu=EVALUATION["gpus"],
    log:
        log="logs/eval/{method}/{budget}/seed-{seed}.log",
        stats="logs/stats/eval/{method}/{budget}/seed-{seed}.json",
    shell:
        "xmas evaluate --model {input.model} {params.options} --out {output} --threads {threads}"
        " --stats {log.stats} 2> {log.log}"


rule summarize:
    input:
        [scores_tsv(*run) for run in evaluation_runs()],
    output:
        summary=EVAL_SUMMARY,
        table="results/eval/summary.txt",
    params:
        runs=" ".join(f"--run {method} {budget} {seed} {scores_tsv(method, budget, seed)}"
                      for method, budget, seed in evaluation_runs()),
    log:
        log="logs/eval/summary.log",
        stats="logs/stats/eval/summary.json",
    shell:
        "xmas summarize {params.runs} --out {output.summary} --table {output.table} --stats {log.stats} 2> {log.log}"
        " && cat {output.table}"
