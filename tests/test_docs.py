"""The README, docs/ and the comments of the configs and profiles stay true to the code: every stage, setting
and file they name exists, and the README's set-up and test commands are the ones CI runs."""

from __future__ import annotations

import re

import pytest

from xmas.cli import STAGES
from xmas.settings import all_settings, load_schema

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMENTED = [
    *sorted((REPO / "config").glob("*.yaml")),
    *sorted((REPO / "profiles").glob("*/config.yaml")),
    *sorted((REPO / "workflow/profiles").glob("*/config.yaml")),  # Snakemake's default profile
]
SECTIONS = {key for key, spec in load_schema()["properties"].items() if "properties" in spec}
SETTINGS = {setting.name for setting in all_settings()}


def misnamed(text: str, quoted: bool = True) -> list[str]:
    """The stages (`xmas <stage>` in commands), settings and repository files that ``text`` names (settings
    and files between backticks when ``quoted``) but that do not exist."""
    settings, path = r"([a-z_]+\.[a-z_]+)", r"((?:config|xmas|tools|docs|tests|workflow|profiles)/[\w./-]*\w)"
    settings, path = (f"`{settings}`", f"`{path}`") if quoted else (rf"(?<![\w./]){settings}\b", path)
    wrong = [
        f"xmas {stage}"
        for stage in re.findall(r"(?:^|`|  )xmas ([a-z][a-z-]+)", text, re.MULTILINE)
        if stage not in STAGES
    ]
    wrong += [
        f"setting {name}"
        for name in re.findall(settings, text)
        if name.split(".")[0] in SECTIONS and not name.endswith((".json", ".yaml", ".parquet")) and name not in SETTINGS
    ]
    wrong += [named for named in re.findall(path, text) if not (REPO / named).exists()]
    return wrong


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_stage_setting_and_file_a_page_names_exists(page):
    assert misnamed(page.read_text()) == [], page.name


def comments(path) -> str:
    """The comments of a YAML file, one per line."""
    return "\n".join(match.group(1) for match in re.finditer(r"(?:^|\s)#(.*)$", path.read_text(), re.MULTILINE))


@pytest.mark.parametrize("path", COMMENTED, ids=lambda path: path.relative_to(REPO).as_posix())
def test_every_stage_setting_and_file_a_config_comment_names_exists(path):
    text = comments(path)
    assert misnamed(text, quoted=False) == [], path.name
    for page, heading in re.findall(r"(README\.md|docs/[\w-]+\.md), \"([^\"]+)\"", text):
        assert f"# {heading}\n" in (REPO / page).read_text(), f"{path.name}: {page}, {heading!r}"


def test_the_readme_gives_the_commands_ci_runs():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci/run").read_text()
    setup = next(line for line in readme.splitlines() if line.startswith("python3 -m venv"))
    assert setup in ci
    assert "\npytest\n" in readme and ci.rstrip().endswith("pytest")
    assert "snakemake results/subset_0.5.json" in readme
