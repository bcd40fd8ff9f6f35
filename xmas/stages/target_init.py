"""Rule ``target_init``: checkpoint 0 of the target, from a preset, a model folder or a Hugging Face id
(:func:`xmas.models.presets.init_model`), set up with the target section's conventions."""

from xmas.models.presets import TARGET_PRESETS, add_init_arguments, run_init


def add_arguments(parser) -> None:
    add_init_arguments(parser, "target-init")


def run(args) -> None:
    run_init(args, "target-init", TARGET_PRESETS)
