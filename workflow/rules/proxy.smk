# The proxy: checkpoint 0 from a preset or model, then a chain of training segments 1..C.
# Each segment resumes from the previous checkpoint, so trajectory jobs of checkpoint c can
# start while segment c+1 trains.


rule standin_model:
    output:
        directory(f"{STANDINS}/{{name}}"),
    log:
        log="logs/standins/{name}.log",
        stats="logs/stats/standins/{name}.json",
    shell:
        "xmas standin --name {wildcards.name} --out {output} --stats {log.stats} 2> {log.log}"


rule proxy_init:
    input:
        annotations=ANNOTATIONS,
        models=local_copies(PROXY["model"], PROXY_PRESETS),
    output:
        directory(checkpoint_dir(0)),
    params:
        model=PROXY["model"],
        presets=PROXY_PRESETS,
        seed=TRAINING["seed"],
        options=init_options(PROXY),
        model_paths=model_path_flags(),
    log:
        log="logs/proxy/checkpoint-0.log",
        stats="logs/stats/proxy/checkpoint-0.json",
    shell:
        "xmas proxy-init --model {params.model} --presets {params.presets} --annotations {input.annotations}"
        " --out {output} --seed {params.seed} {params.options} {params.model_paths}"
        " --stats {log.stats} 2> {log.log}"


rule train_segment:
    input:
        previous=lambda w: checkpoint_dir(int(w.checkpoint) - 1),
        examples=EXAMPLES,
        annotations=ANNOTATIONS,
        images=IMAGE_INPUT,
    output:
        directory(checkpoint_dir("{checkpoint}")),
    params:
        image_root=IMAGE_ROOT,
        checkpoints=CHECKPOINTS,
        options=flags(TRAINING, "epochs", "batch_size", "learning_rate", "weight_decay", "warmup_ratio",
                      "max_grad_norm", "freeze_vision_tower", "seed", "micro_batch_size",
                      "precision", "gradient_checkpointing", "attn_implementation", "deepspeed"),
        launch=launcher(TRAINING["gpus"]),
    threads: TRAINING["threads"]
    resources:
        gpu=TRAINING["gpus"],
    log:
        log="logs/proxy/checkpoint-{checkpoint}.log",
        stats="logs/stats/proxy/checkpoint-{checkpoint}.json",
    shell:
        "{params.launch} train-segment --checkpoint {wildcards.checkpoint} --checkpoints {params.checkpoints}"
        " --previous {input.previous} --out {output} --examples {input.examples}"
        " --annotations {input.annotations} --image-root {params.image_root} {params.options}"
        " --threads {threads} --stats {log.stats} 2> {log.log}"
