"""The code and the workflow as a linter sees them: tools/lint.sh's checks (ruff, ruff format, snakefmt, vermin for
Python 3.10), and `snakemake --lint` with only the findings that workflow/rules/common.smk justifies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_snakemake

JUSTIFIED_LINTS = {
    "Specify a conda environment or container for each rule.",
    "Param image_root is a prefix of input or output file but hardcoded",
    "Environment variable XMAS_GPU_PARTITION used but not asserted with envvars directive",
    "No log directive defined",
}


LINT = REPO / "tools/lint.sh"
CHECKS = re.search(r"^CHECKS=\((.+)\)$", LINT.read_text(), re.MULTILINE).group(1).split()


def lint(*checks: str) -> subprocess.CompletedProcess:
    """tools/lint.sh, as .ci/run's fast step runs it, with this environment's linters."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", str(LINT), *checks], capture_output=True, text=True, env={**os.environ, "PATH": path}
    )


@pytest.mark.parametrize("check", CHECKS)
def test_the_linters_find_nothing(check):
    """ruff, ruff format, snakefmt and vermin (the code, the tests and the tools run on Python 3.10)."""
    result = lint(check)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def test_lint_names_its_checks_when_asked_for_one_it_lacks():
    result = lint("black")
    assert result.returncode == 2
    assert f"no check named 'black' (the checks: {' '.join(CHECKS)})" in result.stderr


def test_snakemake_lint_finds_only_what_the_workflow_justifies(tmp_path):
    result = run_snakemake(tmp_path, "--lint")
    findings = {
        re.sub(r" in line \d+\.$", "", finding.rstrip(":"))
        for finding in re.findall(r"^    \* (.+)$", result.stderr, re.MULTILINE)
    }
    assert findings == JUSTIFIED_LINTS, findings - JUSTIFIED_LINTS
