# The reports: results/report.html, what was selected and why, from the selection alone (no
# fine-tune waits on it); results/eval/report.html, the same page with the evaluation's comparison.
# `snakemake plan` prints what every rule's jobs ask a cluster for (and, with profiles/slurm, which of them
# no node of their partition could run); it writes no file.
import json


rule report:
    input:
        examples=EXAMPLES,
        annotations=ANNOTATION_FILES,
        clusters=CLUSTERS,
        trajectories="results/trajectories.parquet",
        manifests=[subset_manifest(method, budget) for method, budget in methods_and_budgets()],
        coherence=COHERENCE_FILE or [],
    output:
        "results/report.html",
    log:
        log="logs/report.log",
        stats="logs/stats/report.json",
    resources:
        **job("report"),
    params:
        manifests=" ".join(
            f"--manifest {method} {budget} {subset_manifest(method, budget)}"
            for method, budget in methods_and_budgets()
        ),
        annotations=ANNOTATIONS_OPTION,
        evaluation="",
        coherence=f"--coherence {COHERENCE_FILE}" if COHERENCE_FILE else "",
        options=flags("report"),
        run_config=json.dumps(config, sort_keys=True),
    shell:
        "xmas report --examples {input.examples} {params.annotations}"
        " --clusters {input.clusters} --trajectories {input.trajectories} {params.manifests} {params.evaluation}"
        " {params.coherence}"
        " --run-config {params.run_config:q} --stats-dir logs/stats --out {output} {params.options}"
        " --stats {log.stats} 2> {log.log}"


use rule report as evaluation_report with:
    input:
        examples=EXAMPLES,
        annotations=ANNOTATION_FILES,
        clusters=CLUSTERS,
        trajectories="results/trajectories.parquet",
        manifests=[subset_manifest(method, budget) for method, budget in methods_and_budgets()],
        coherence=COHERENCE_FILE or [],
        eval_summary=EVAL_SUMMARY,
    output:
        "results/eval/report.html",
    log:
        log="logs/eval/report.log",
        stats="logs/stats/eval/report.json",
    params:
        manifests=" ".join(
            f"--manifest {method} {budget} {subset_manifest(method, budget)}"
            for method, budget in methods_and_budgets()
        ),
        annotations=ANNOTATIONS_OPTION,
        evaluation=f"--eval-summary {EVAL_SUMMARY}",
        coherence=f"--coherence {COHERENCE_FILE}" if COHERENCE_FILE else "",
        options=flags("report"),
        run_config=json.dumps(config, sort_keys=True),


rule plan:
    localrule: True
    run:
        print_plan()
