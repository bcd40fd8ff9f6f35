"""Project plumbing: dependency lists in step, the CLI, one hop from a rule to its stage module and test."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

try:
    import tomllib  # novermin: 3.11, with the tomli backport below on 3.10
except ModuleNotFoundError:  # Python 3.10: the backport the dev extra installs there
    import tomli as tomllib

from xmas.cli import STAGES, main

from conftest import REPO


def test_environment_yml_installs_what_pyproject_declares():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    dev = extras["dev"]
    assert "xmas[lint]" in dev  # the dev extra takes the linters' pins from the lint extra
    declared = set(project["dependencies"]) | set(dev) - {"xmas[lint]"} | set(extras["lint"])
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    assert set(pip) - {"-e ."} == declared


def test_gpu_extra_holds_the_gpu_only_packages():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {spec.split(">")[0].split("=")[0] for spec in extras["gpu"]}
    assert {"flash-attn", "deepspeed"} <= names and any(n.startswith("faiss-gpu") for n in names)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_has_help_with_an_example(stage, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([stage, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"xmas {stage}" in out and "--stats" in out


def test_console_script_lists_the_stages():
    result = subprocess.run([sys.executable, "-m", "xmas", "--help"], capture_output=True, text=True, check=True)
    assert all(stage in result.stdout for stage in STAGES)


def test_stage_error_is_one_clear_line(tmp_path, capfd):
    missing = tmp_path / "nope.json"
    code = main(
        [
            "prepare",
            "--annotations",
            str(missing),
            "--image-root",
            str(tmp_path),
            "--model",
            str(tmp_path),
            "--out",
            str(tmp_path / "e.parquet"),
        ]
    )
    err = capfd.readouterr().err
    assert code == 1 and f"prepare failed: {missing}: annotation file not found" in err and "Traceback" not in err


def rule_names() -> set[str]:
    """The workflow's rules (``rule x:``, ``checkpoint x:`` and ``use rule y as x``)."""
    import re

    text = "\n".join(path.read_text() for path in (REPO / "workflow/rules").glob("*.smk"))
    defined = set(re.findall(r"^\s*(?:rule|checkpoint) (\w+):", text, re.MULTILINE))
    return defined | set(re.findall(r" as (\w+) with:", text))


def test_every_rule_is_one_stage_with_its_module_and_its_test():
    """A rule's stage is `xmas <rule>` in xmas/stages/<rule>.py, tested in tests/stages/test_<rule>.py;
    `use rule ... as` variants (the loss baseline's, the feature methods' reference, the report with the
    evaluation) and the copy of XMAS's subset reuse another's; `plan` only prints the resources the jobs
    ask for."""
    variants = {"trajectory_loss", "merge_loss", "cluster_loss", "reference_init", "evaluation_report", "main_subset"}
    stages = {name.replace("-", "_") for name in STAGES}
    assert rule_names() - variants - {"all", "plan"} == stages
    for stage in stages:
        assert (REPO / f"xmas/stages/{stage}.py").is_file(), stage
        assert (REPO / f"tests/stages/test_{stage}.py").is_file(), stage


def test_no_stage_imports_another_stage():
    """Stages share code through xmas/data, xmas/models and xmas/training, never through each other."""
    import ast

    for module in (REPO / "xmas/stages").glob("*.py"):
        tree = ast.parse(module.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not {name for name in imported if name.startswith("xmas.stages")}, module.name
