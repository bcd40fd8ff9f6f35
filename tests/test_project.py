"""Project plumbing: dependency lists in step, CLI help, config schema."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
import yaml
from snakemake.utils import validate

from conftest import REPO
from xmas.cli import STAGES, main


def test_environment_yml_installs_what_pyproject_declares():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
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
    code = main(["prepare", "--annotations", str(missing), "--image-root", str(tmp_path),
                 "--model", str(tmp_path), "--out", str(tmp_path / "e.parquet")])
    err = capfd.readouterr().err
    assert code == 1 and f"prepare failed: {missing}: annotation file not found" in err and "Traceback" not in err


def schema_check(config):
    validate(config, str(REPO / "workflow/schemas/config.schema.yaml"))
    return config


def test_shipped_config_is_valid_and_defaults_fill_in():
    config = schema_check(yaml.safe_load((REPO / "config/config.yaml").read_text()))
    assert config["training"]["checkpoints"] == 5 and config["trajectory"]["shards"] == 2
    minimal = schema_check({"dataset": {"annotations": "a.json", "image_root": "img"}})
    assert minimal["selection"]["min_cluster_size"] == 3 and minimal["proxy"]["model"] == "demo-tiny"
    assert minimal["proxy"]["image_position"] == "front" and minimal["model_paths"] == {}


@pytest.mark.parametrize(("config", "named"), [
    ({"training": {"checkpoints": 1}}, "checkpoints"),
    ({"selection": {"feature": "svd"}}, "svd"),
    ({"trajectory": {"head_reduce": "max"}}, "max"),
    ({"training": {"epoch": 3}}, "epoch"),
    ({"dataset": {"annotations": "a.json"}}, "image_root"),
])
def test_config_errors_name_the_key_or_value(config, named):
    with pytest.raises(Exception) as caught:
        schema_check(config)
    assert named in str(caught.value)
