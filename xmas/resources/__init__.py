"""Files the package ships: the config schema, model presets, conversation formats, DeepSpeed
configs, the demo generators' settings and the dataset manifests. Found one way: :func:`resource`."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def resource(*parts: str) -> Path:
    """The path of a shipped file, e.g. ``resource("deepspeed", "zero3.json")``."""
    return Path(str(files(__name__).joinpath(*parts)))
