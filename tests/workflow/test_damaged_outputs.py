"""Fault injection on the reduced demo's finished run: an output cut short, emptied or stripped of a file is
reported by a dry run, which changes no file, and set aside (as `<name>.damaged`) and made again by the next
run; the subsets come out byte-identical. Without its seal, Snakemake would trust any of them by its time stamp
("Nothing to be done")."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from xmas.io import seal_path

from conftest import SUBSET_DIGESTS, TARGETS, job_counts, run_snakemake, snakemake


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path):
    path.write_bytes(b"")


def delete(path):
    path.unlink()


@pytest.fixture
def finished_run(workflow_run, tmp_path):
    """A copy of the reduced demo's run (time stamps and Snakemake's records kept), for one fault."""
    project = tmp_path / "project"
    shutil.copytree(workflow_run, project, symlinks=True)
    assert "Nothing to be done" in snakemake(project, "-n", *TARGETS).stdout
    return project


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, damaged, output, remade",
    [
        (truncate, "results/subset_0.5.json", "results/subset_0.5.json", {"main_subset"}),
        (truncate, "results/proxy/checkpoint-3/model.safetensors", "results/proxy/checkpoint-3", {"train_segment"}),
        (delete, "results/proxy/checkpoint-3/processor_config.json", "results/proxy/checkpoint-3", {"train_segment"}),
        (empty, "results/selection/clusters.parquet", "results/selection/clusters.parquet", {"cluster"}),
    ],
    ids=["subset-truncated", "weights-truncated", "checkpoint-file-deleted", "clusters-emptied"],
)
def test_a_damaged_output_is_made_again(finished_run, fault, damaged, output, remade):
    """Requested with the subsets (an intermediate output nothing needs to remake is only set aside)."""
    written = (finished_run / damaged).read_bytes()
    fault(finished_run / damaged)
    files = snapshot(finished_run)
    planned = snakemake(finished_run, "-n", output, *TARGETS)
    assert f"{output}" in planned.stderr and "a run of snakemake sets it aside and makes it again" in planned.stderr
    assert snapshot(finished_run) == files  # a dry run only looks
    ran = snakemake(finished_run, "--cores", "2", output, *TARGETS)
    assert f"set aside as {output}.damaged; this run makes it again" in ran.stderr
    assert remade <= set(job_counts(ran.stderr))
    assert (finished_run / damaged).read_bytes() == written
    assert (finished_run / f"{output}.damaged").exists() and seal_path(finished_run / output).exists()
    for target, digest in SUBSET_DIGESTS.items():
        assert hashlib.sha256((finished_run / target).read_bytes()).hexdigest() == digest, target
    assert "Nothing to be done" in snakemake(finished_run, "-n", output, *TARGETS).stdout


def snapshot(project) -> dict[str, tuple[int, int]]:
    """Size and modification time of every file of a project, Snakemake's own records aside."""
    return {
        str(path.relative_to(project)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(project.rglob("*"))
        if path.is_file() and ".snakemake" not in path.parts
    }


@pytest.mark.slow
def test_looking_at_a_run_with_a_damaged_output_changes_no_file(finished_run):
    """Dry runs, --lint, the DAG drawing and `snakemake plan` report the damage and leave every file as it is."""
    truncate(finished_run / "results/subset_0.5.json")
    files = snapshot(finished_run)
    for command in (["-n", *TARGETS], ["--lint"], ["--dag", "dot", *TARGETS], ["--cores", "1", "plan"]):
        result = run_snakemake(finished_run, *command)  # --lint exits 1 on its (justified) conda findings
        assert result.returncode == 0 or command == ["--lint"], result.stderr[-3000:]
        assert "results/subset_0.5.json holds" in result.stderr, command
        assert snapshot(finished_run) == files, command


def test_the_command_an_error_gives_to_redo_an_output_plans_exactly_its_job(workflow_run):
    counts = job_counts(snakemake(workflow_run, "-n", "--force", "results/proxy/checkpoint-2").stdout)
    assert counts == {"train_segment": 1, "total": 1}
