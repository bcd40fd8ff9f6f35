# The report: one self-contained HTML page about the selection, its evaluation and the run.
import json


rule report:
    input:
        examples=EXAMPLES,
        annotations=ANNOTATIONS,
        clusters=CLUSTERS,
        trajectories="results/trajectories.parquet",
        manifests=[subset_manifest(method, budget) for method, budget in methods_and_budgets()],
        eval_summary=EVAL_SUMMARY,
    output:
        "results/report.html",
    log:
        log="logs/report.log",
        stats="logs/stats/report.json",
    params:
        manifests=" ".join(
            f"--manifest {method} {budget} {subset_manifest(method, budget)}"
            for method, budget in methods_and_budgets()
        ),
        run_config=json.dumps(config, sort_keys=True),
    shell:
        "xmas report --examples {input.examples} --annotations {input.annotations}"
        " --clusters {input.clusters} --trajectories {input.trajectories} {params.manifests}"
        " --eval-summary {input.eval_summary}"
        " --run-config {params.run_config:q} --stats-dir logs/stats --out {output}"
        " --stats {log.stats} 2> {log.log}"
