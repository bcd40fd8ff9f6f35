"""The package as `pip install .` (not editable) installs it: its data files travel with it, and the
workflow runs from another folder with it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from conftest import REPO, SUBSET_DIGESTS, TARGETS, reduced_project, snakemake_command, workflow_environment


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package installed (not editable) into a folder of its own, put first on the path."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return site


def test_the_installed_package_carries_its_data_files(installed):
    environment = workflow_environment(PYTHONPATH=str(installed))
    code = "import xmas.settings as s; print(s.__file__, s.load_schema()['type'])"
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=installed.parent, check=True
    )
    assert found.stdout.split() == [str(installed / "xmas/settings.py"), "object"]
    for name in (
        "config.schema.yaml",
        "proxy_presets.yaml",
        "target_presets.yaml",
        "conversations.yaml",
        "deepspeed/zero3.json",
        "demo/shapes.yaml",
        "demo/rehearsal.yaml",
        "datasets/llava665k.yaml",
    ):
        assert (installed / "xmas/resources" / name).is_file(), name


@pytest.mark.slow
def test_the_installed_package_runs_the_demo_from_another_folder(installed, tmp_path):
    project = reduced_project(tmp_path / "elsewhere")
    environment = workflow_environment(PYTHONPATH=os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        snakemake_command(project, "--cores", "2", *TARGETS),
        cwd=project,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for target, digest in SUBSET_DIGESTS.items():
        assert hashlib.sha256((project / target).read_bytes()).hexdigest() == digest, target
