"""Every setting from one place: the schema's defaults, the stages' options generated from it, the
workflow's flags, and the configuration reference in the docs."""

from __future__ import annotations

import argparse
import dataclasses
import shlex

import pytest
import yaml
from snakemake.utils import validate

from xmas.cli import STAGES, build_parser, stage_module
from xmas.settings import (
    SCHEMA,
    add_settings,
    all_settings,
    defaults,
    reference_markdown,
    settings_class,
    settings_of,
    stage_defaults,
    stage_flags,
)

from conftest import REPO


def schema_check(config):
    validate(config, str(SCHEMA))
    return config


def test_an_empty_config_is_the_demo_with_every_default_filled_in():
    config = schema_check({})
    assert config["training"]["checkpoints"] == 5 and config["trajectory"]["shards"] == 2
    assert config["proxy"]["model"] == "demo-tiny" and config["dataset"]["demo"] == "shapes"
    assert config["selection"]["min_cluster_size"] == 3 and config["model_paths"] == {}


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"training": {"checkpoints": 1}}, "checkpoints"),
        ({"selection": {"feature": "svd"}}, "svd"),
        ({"trajectory": {"head_reduce": "max"}}, "max"),
        ({"training": {"epoch": 3}}, "epoch"),
        ({"dataset": {"entry": "mllm_demo"}}, "annotations"),
    ],
)
def test_config_errors_name_the_key_or_value(config, named):
    with pytest.raises(Exception) as caught:
        schema_check(config)
    assert named in str(caught.value)


def test_every_tagged_stage_exists():
    tagged = {stage for setting in all_settings() for stage in setting.stages}
    assert tagged <= set(STAGES), tagged - set(STAGES)


TAGGED_STAGES = sorted({stage for setting in all_settings() for stage in setting.stages})


@pytest.mark.parametrize("stage", TAGGED_STAGES)
def test_no_setting_takes_the_flag_of_a_stages_own_option(stage):
    """A setting named like one of the stage's inputs (``--examples``) would not build its parser."""
    assert "--stats" in stage_parser(stage).format_help()


def stage_parser(stage: str) -> argparse.ArgumentParser:
    import importlib

    _, parsers = build_parser()
    importlib.import_module(stage_module(stage)).add_arguments(parsers[stage])
    return parsers[stage]


def settings_parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_settings(parser, stage)
    return parser


@pytest.mark.parametrize("stage", TAGGED_STAGES)
def test_a_stage_takes_its_settings_with_the_schemas_defaults(stage):
    flags = {action.dest for action in stage_parser(stage)._actions}
    assert set(defaults(stage)) <= flags
    settings = settings_of(settings_parser(stage).parse_args([]), stage)
    assert settings == stage_defaults(stage) and dataclasses.asdict(settings) == defaults(stage)
    with pytest.raises(dataclasses.FrozenInstanceError):  # a stage cannot change its settings on the way
        settings.__setattr__(next(iter(defaults(stage))), None)


def test_settings_are_typed_and_refuse_a_name_the_schema_does_not_have():
    fields = {field.name: field.type for field in dataclasses.fields(settings_class("trajectory"))}
    assert fields["top_k"] == "int" and fields["group_by_length"] == "bool" and fields["dtype"] == "str"
    assert stage_defaults("trajectory").group_by_length is True  # the schema's default, not a fallback in code
    with pytest.raises(TypeError, match="top_kk"):
        stage_defaults("trajectory", top_kk=3)


@pytest.mark.parametrize("config_file", ["llava665k.yaml", "visionflan.yaml", "rehearsal.yaml"])
def test_the_workflows_flags_give_each_stage_the_configs_values(config_file):
    """What a rule passes is what the stage reads: every setting, for every stage, round trip."""
    config = schema_check(yaml.safe_load((REPO / "config" / config_file).read_text()))
    for stage in TAGGED_STAGES:
        parsed = settings_parser(stage).parse_args(shlex.split(stage_flags(config, stage)))
        for setting in [s for s in all_settings() if stage in s.stages]:
            expected = (config[setting.section] if setting.section else config)[setting.key]
            got = getattr(settings_of(parsed, stage), setting.key)
            if setting.name in ("trajectory.layers", "selection.clusters"):  # alternatives arrive as text
                got, expected = str(got), str(expected).replace("[", "").replace("]", "").replace(" ", "")
            assert got == expected, (stage, setting.name)


def test_help_shows_the_schemas_description_and_config_key(capsys):
    with pytest.raises(SystemExit):
        stage_parser("train-segment").parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    expected = "AdamW's, cosine schedule (paper 2e-5) (default: 0.001; config training.learning_rate)"
    assert f"--learning-rate LEARNING_RATE {expected}" in out


def test_the_configuration_reference_is_generated_from_the_schema():
    """docs/configuration.md is what `python tools/docs.py` writes; rerun it after changing the schema."""
    assert (REPO / "docs/configuration.md").read_text() == reference_markdown()
