"""The README and docs/ stay true to the code: every stage, setting and file they name exists, and the
README's set-up and test commands are the ones CI runs."""

from __future__ import annotations

import re

import pytest

from xmas.cli import STAGES
from xmas.settings import all_settings, load_schema

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = {key for key, spec in load_schema()["properties"].items() if "properties" in spec}
SETTINGS = {setting.name for setting in all_settings()}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_stage_setting_and_file_a_page_names_exists(page):
    text = page.read_text()
    for stage in re.findall(r"(?:^|`|  )xmas ([a-z][a-z-]+)", text, re.MULTILINE):  # in commands, not prose
        assert stage in STAGES, f"{page.name}: xmas {stage}"
    for name in re.findall(r"`([a-z_]+\.[a-z_]+)`", text):
        if name.split(".")[0] in SECTIONS and not name.endswith((".json", ".yaml", ".parquet")):
            assert name in SETTINGS, f"{page.name}: setting {name}"
    for path in re.findall(r"`((?:config|xmas|tools|docs|tests|workflow|profiles)/[\w./-]+)`", text):
        assert (REPO / path).exists(), f"{page.name}: {path}"


def test_the_readme_gives_the_commands_ci_runs():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci/run").read_text()
    setup = next(line for line in readme.splitlines() if line.startswith("python3 -m venv"))
    assert setup in ci
    assert "\npytest\n" in readme and ci.rstrip().endswith("pytest")
    assert "snakemake results/subset_0.5.json" in readme
