# Outputs whose files no longer match their seal (cut short, emptied, a checkpoint missing a file).
# Snakemake trusts any output by its time stamp, so a run that will make it again needs it out of the
# way first: a run sets each aside as `<name>.damaged` while it parses this file, and remakes it. A dry
# run, `--lint`, `snakemake plan`, the DAG drawings and the listings only report them and change no
# file. Snakemake tells no Snakefile whether the invocation runs jobs (it knows only after parsing),
# so its command line says; on any other, nothing is set aside and the report says how to remake them.
# Jobs that Snakemake spawns itself (Slurm, subprocesses) parse this file too, and leave them alone.

# Snakemake options after which no job runs, and the short ones of them (that combine, as in -np).
LOOKING_ONLY = {
    "--dry-run",
    "--dryrun",
    "--lint",
    "--dag",
    "--rulegraph",
    "--filegraph",
    "--d3dag",
    "--summary",
    "--detailed-summary",
    "--list-rules",
    "--list",
    "--list-target-rules",
    "--list-changes",
    "--list-input-changes",
    "--list-params-changes",
    "--list-code-changes",
    "--list-untracked",
    "--archive",
    "--cleanup-metadata",
    "--cleanup-shadow",
    "--unlock",
    "--print-compilation",
    "--export-cwl",
    "--report",
    "--containerize",
    "--touch",
    "--delete-all-output",
    "--delete-temp-output",
    "--generate-unit-tests",
    "--list-resources",
    "--lc",
    "--li",
    "--lp",
    "--lt",
    "--lu",
    "--cm",
}
LOOKING_ONLY_SHORT = set("nSDlt")


def runs_jobs(argv):
    """Whether this `snakemake` command line runs jobs: no looking-only option, nor the `plan` target alone."""
    words = [word.split("=")[0] for word in argv[1:]]
    if any(word in LOOKING_ONLY for word in words):
        return False
    if any(re.fullmatch(r"-[a-zA-Z]+", word) and set(word[1:]) & LOOKING_ONLY_SHORT for word in words):
        return False
    return "plan" not in words and "snakemake" in argv[0]  # not Snakemake driven by another program


DAMAGED = [] if workflow.remote_exec or workflow.subprocess_exec else damaged_outputs("results")
if runs_jobs(sys.argv):
    for line in set_aside(DAMAGED):
        print(f"xmas: {line}; this run makes it again", file=sys.stderr)
else:
    for damage in DAMAGED:
        print(f"xmas: {damage.what}; a run of snakemake sets it aside and makes it again", file=sys.stderr)
