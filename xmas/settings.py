"""Every setting of the workflow, from one place: ``xmas/resources/config.schema.yaml``.

The schema gives each setting its type, bounds, default and description. The workflow validates
its config against it (filling in the defaults), and every stage's options come from it too: a
property tagged ``x-stages: [stage, ...]`` is a ``--flag`` of those stages, with the schema's type,
default and description (:func:`add_settings`), and the workflow passes the config's value for
it (:func:`stage_flags`). Adding a setting is one schema entry plus the code that uses it.

This module imports no torch: the Snakefile uses it to build the DAG.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import shlex
from pathlib import Path

import yaml

from xmas.resources import resource

SCHEMA = resource("config.schema.yaml")
TYPES = {"integer": int, "number": float, "string": str}


@functools.cache
def load_schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


@dataclasses.dataclass(frozen=True)
class Setting:
    section: str | None  # None for a top-level setting
    key: str
    spec: dict

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}" if self.section else self.key

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def default(self):
        return self.spec.get("default")

    @property
    def stages(self) -> list[str]:
        return self.spec.get("x-stages", [])


def all_settings() -> list[Setting]:
    """Every setting of the schema, in its order: top-level ones and those of each section."""
    found = []
    for key, spec in load_schema()["properties"].items():
        if spec.get("type") == "object" and "properties" in spec:
            found += [Setting(key, name, item) for name, item in spec["properties"].items()]
        else:
            found.append(Setting(None, key, spec))
    return found


def default_of(name: str):
    """The schema's default of the setting ``section.key`` (or ``key``)."""
    return next(setting.default for setting in all_settings() if setting.name == name)


def stage_settings(stage: str) -> list[Setting]:
    return [setting for setting in all_settings() if stage in setting.stages]


def annotation(spec: dict) -> str:
    """The Python type of a setting's value, as text (the settings classes' annotations)."""
    kinds = spec.get("type", "string" if "enum" in spec or "anyOf" in spec or "oneOf" in spec else None)
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    names = {
        "integer": "int",
        "number": "float",
        "string": "str",
        "boolean": "bool",
        "array": "list",
        "object": "dict",
        "null": "None",
    }
    typed = [names[kind] for kind in kinds if kind in names]
    if "oneOf" in spec or "anyOf" in spec or not typed:
        return "object"  # alternatives (auto or a number, a preset or a file): the stage reads them
    return " | ".join(typed)


@functools.cache
def settings_class(stage: str) -> type:
    """The stage's settings as a frozen dataclass: a field per setting of the stage, with the schema's
    type and default. ``settings_class("cluster")(feature="sv1")`` is the cluster stage's settings at the
    schema's defaults but ``feature``; an unknown name is an error."""
    fields = []
    for setting in stage_settings(stage):
        default = setting.default
        if isinstance(default, (list, dict)):
            field = dataclasses.field(default_factory=lambda default=default: type(default)(default))
        else:
            field = dataclasses.field(default=default)
        fields.append((setting.key, annotation(setting.spec), field))
    name = "".join(part.capitalize() for part in stage.split("-")) + "Settings"
    return dataclasses.make_dataclass(name, fields, frozen=True)


def stage_defaults(stage: str, **changes):
    """A stage's settings: the schema's defaults, but for ``changes`` (what tests and callers build)."""
    return settings_class(stage)(**changes)


def defaults(stage: str) -> dict:
    """A stage's settings at their schema defaults, by name."""
    return dataclasses.asdict(stage_defaults(stage))


def kinds_of(spec: dict) -> list[str]:
    """The JSON types a setting takes besides null."""
    kinds = spec.get("type")
    return [kinds] if isinstance(kinds, str) else [kind for kind in kinds or [] if kind != "null"]


def value_type(spec: dict):
    """The Python type of a flag's value; settings with alternatives (``auto`` or a number, a preset
    or a file, ...) arrive as text and their stage reads them."""
    kinds = kinds_of(spec)
    return TYPES.get(kinds[0], str) if len(kinds) == 1 else str


def comma_list(item_type):
    def parse(text: str) -> list:
        return [item_type(part) for part in text.split(",") if part]

    parse.__name__ = f"comma-separated {item_type.__name__}"
    return parse


def key_values(text: str) -> tuple[str, str]:
    name, separator, value = text.partition("=")
    if not separator or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def help_of(setting: Setting) -> str:
    text = setting.spec.get("description", "").strip()
    default = setting.default
    if default is None or default == {}:
        shown = "none"
    else:
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
    text = f"{text} (default: {shown}; config {setting.name})" if text else f"(default: {shown}; config {setting.name})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_settings(parser: argparse.ArgumentParser, stage: str) -> None:
    """The stage's settings as options, typed, defaulted and described by the schema."""
    group = parser.add_argument_group("settings (config keys; defaults from the workflow's config schema)")
    for setting in stage_settings(stage):
        spec, options = setting.spec, {"default": setting.default, "help": help_of(setting)}
        if spec.get("type") == "boolean":
            options["action"] = argparse.BooleanOptionalAction
        elif spec.get("type") == "object":
            options.update(type=key_values, nargs="*", metavar="NAME=VALUE")
            options["default"] = dict(options["default"] or {})
        elif kinds_of(spec) == ["array"]:
            options["type"] = comma_list(value_type(spec.get("items", {})))
        elif "enum" in spec:
            options["choices"] = [choice for choice in spec["enum"] if choice is not None]
        else:
            options["type"] = value_type(spec)
        group.add_argument(setting.flag, dest=setting.key, **options)


def settings_of(args: argparse.Namespace, stage: str):
    """The stage's settings (:func:`settings_class`) from its parsed options."""
    values = {}
    for setting in stage_settings(stage):
        value = getattr(args, setting.key)
        values[setting.key] = dict(value) if setting.spec.get("type") == "object" else value
    return settings_class(stage)(**values)


def render(setting: Setting, value) -> list[str]:
    if value is None or value == {}:
        return []
    if isinstance(value, bool):
        return [setting.flag if value else "--no-" + setting.flag[2:]]
    if isinstance(value, dict):
        return [setting.flag, *(f"{name}={item}" for name, item in value.items())]
    if isinstance(value, list):
        return [setting.flag, ",".join(map(str, value))]
    return [setting.flag, str(value)]


def config_settings(config: dict, stage: str):
    """A stage's settings (:func:`settings_class`) from a validated config: what its rule's flags pass it."""
    values = {}
    for setting in stage_settings(stage):
        scope = config[setting.section] if setting.section else config
        values[setting.key] = scope[setting.key]
    return settings_class(stage)(**values)


def stage_flags(config: dict, stage: str) -> str:
    """The options that pass a (validated) config's values of a stage's settings to it, shell-quoted."""
    words = []
    for setting in stage_settings(stage):
        scope = config.get(setting.section, {}) if setting.section else config
        words += render(setting, scope.get(setting.key, setting.default))
    return shlex.join(words)


# The section a model preset's `recipe` sets: the settings its model is trained with.
RECIPE_SECTIONS = {"proxy": ("proxy_presets.yaml", "training"), "target": ("target_presets.yaml", "target")}


def preset_of(config: dict, section: str) -> dict:
    """The preset ``config[section]["model"]`` names ({} for a folder or a Hub id)."""
    presets = config.get(section, {}).get("presets") or resource(RECIPE_SECTIONS[section][0])
    return (yaml.safe_load(Path(presets).read_text()) or {}).get(config.get(section, {}).get("model"), {})


def with_recipes(config: dict, explicit: dict) -> dict:
    """The validated ``config``, changed in place, with its model presets' recipes: a preset's ``recipe``
    values replace the schema's defaults of its section, and settings given in ``explicit`` (the config as
    written, before validation filled in the defaults) stay as given."""
    for section, (_, trained) in RECIPE_SECTIONS.items():
        recipe = preset_of(config, section).get("recipe", {})
        known = load_schema()["properties"][trained]["properties"]
        unknown = sorted(set(recipe) - set(known))
        if unknown:
            raise ValueError(
                f"the recipe of {section} preset {config[section]['model']!r} sets {', '.join(unknown)}, "
                f"which are not settings of {trained}"
            )
        given = explicit.get(trained) or {}
        config[trained] = {**config[trained], **{key: value for key, value in recipe.items() if key not in given}}
    return config


def job_resources(config: dict, rule: str) -> dict:
    """What a job of ``rule`` asks a cluster for: the config's ``resources.<rule>`` over the schema's
    default for that rule (rules without their own entry take ``resources.default``)."""
    jobs = load_schema()["properties"]["resources"]["properties"]
    name = rule if rule in jobs else "default"
    return {**jobs[name]["default"], **config.get("resources", {}).get(name, {})}


def reference_markdown() -> str:
    """``docs/configuration.md``: every setting with its default, its stages and its meaning."""
    schema = load_schema()
    lines = [
        "# Configuration reference",
        "",
        "Generated from `xmas/resources/config.schema.yaml` by `python tools/docs.py`; a test fails when it is",
        "stale. Defaults are the demo's; `config/llava665k.yaml` and `config/visionflan.yaml` set what the",
        "paper changes. A setting marked with stages is also an option of those `xmas` stages.",
        "",
    ]
    sections: dict[str | None, list[Setting]] = {}
    for setting in all_settings():
        sections.setdefault(setting.section, []).append(setting)
    for section, settings in sections.items():
        description = " ".join(schema["properties"][section].get("description", "").split()) if section else ""
        lines += [f"## `{section}`" if section else "## Top level", ""]
        if description:
            lines += [description, ""]
        lines += ["| setting | default | stages | meaning |", "| --- | --- | --- | --- |"]
        for setting in settings:
            meaning = " ".join(setting.spec.get("description", "").split())
            if setting.spec.get("x-choices") == "methods":
                from xmas.methods import choices_markdown

                meaning += ": " + choices_markdown()
            meaning = meaning.replace("|", "\\|")
            stages = ", ".join(f"`{stage}`" for stage in setting.stages) or "workflow"
            default = yaml.safe_dump(setting.default, default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"| `{setting.name}` | `{default}` | {stages} | {meaning} |")
        lines.append("")
    return "\n".join(lines)
