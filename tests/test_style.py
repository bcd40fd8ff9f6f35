"""The code and the workflow as a linter sees them: ruff, vermin (Python 3.10), snakefmt, and `snakemake --lint`
with only the findings that workflow/rules/common.smk justifies."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, run_snakemake

JUSTIFIED_LINTS = {"Specify a conda environment or container for each rule.",
                   "Param image_root is a prefix of input or output file but hardcoded",
                   "Environment variable XMAS_GPU_PARTITION used but not asserted with envvars directive",
                   "No log directive defined"}


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]


def test_the_package_tests_and_tools_run_on_python_3_10():
    """What pyproject.toml's requires-python promises. vermin reads `.long()` as Python 2's `long`."""
    vermin = Path(sys.executable).with_name("vermin")  # its package has no __main__
    result = subprocess.run([str(vermin), "--target=3.10-", "--violations", "--eval-annotations",
                             "--no-tips", "--exclude", "long", "xmas", "tests", "tools"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]


def test_the_workflow_is_formatted_as_snakefmt_writes_it():
    result = subprocess.run([sys.executable, "-m", "snakefmt", "--check", str(REPO / "workflow")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def test_snakemake_lint_finds_only_what_the_workflow_justifies(tmp_path):
    result = run_snakemake(tmp_path, "--lint")
    findings = {re.sub(r" in line \d+\.$", "", finding.rstrip(":"))
                for finding in re.findall(r"^    \* (.+)$", result.stderr, re.MULTILINE)}
    assert findings == JUSTIFIED_LINTS, findings - JUSTIFIED_LINTS
