"""Rule ``proxy_init``: checkpoint 0 of the proxy, from a preset, a model folder or a Hugging Face id
(:func:`xmas.models.presets.init_model`), set up with the proxy section's conventions."""

from xmas.models.presets import PROXY_PRESETS, add_init_arguments, run_init


def add_arguments(parser) -> None:
    add_init_arguments(parser, "proxy-init")


def run(args) -> None:
    run_init(args, "proxy-init", PROXY_PRESETS)
