"""Checkpoint folders: a standard Hugging Face folder (``save_pretrained`` of model and processor,
loadable with ``AutoModelForImageTextToText`` and ``AutoProcessor``) plus ``xmas_encoding.json``
(:class:`xmas.models.encoding.Encoding`). A LoRA fine-tune's folder holds the adapter and names
its base in ``xmas_finetune.json``.

Processors are loaded for images only (:func:`load_processor`): transformers builds the video
processors of Qwen-VL and SmolVLM with torchvision alone, which a CPU machine often lacks, and the
PIL image processors preprocess alike on every machine, with or without torchvision.
"""

from __future__ import annotations

import contextlib
import inspect
import pickle
from pathlib import Path

import torch

from xmas.errors import XmasError
from xmas.io import named_on_failure, read_json, verify
from xmas.models.families import family_of_model_type

FINETUNE_RUN_FILE = "xmas_finetune.json"


@contextlib.contextmanager
def hub_errors(what: str, name: str | Path):
    """A missing model (offline, misspelt id, no such folder) as one line naming it."""
    try:
        yield
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise XmasError(f"{what} {str(name)!r} cannot be loaded: {first_line}") from None


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None):
    """Model and processor from a checkpoint folder (or, for a ``pretrained`` preset, a Hugging Face id)."""
    from transformers import AutoModelForImageTextToText

    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise XmasError(f"{path} is not a model checkpoint (no config.json)")
    verify(path)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with hub_errors("model", path), unreadable_files(Path(path)):
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        return model, load_processor(path, model.config.model_type)


def image_only(processor_class):
    """The family's processor class without its video processor (the rest of it unchanged)."""
    if "video_processor" not in processor_class.get_attributes():
        return processor_class
    from transformers.processing_utils import ProcessorMixin

    class ImageOnly(processor_class):
        # SmolVLM's own apply_chat_template reads video defaults from its video processor
        apply_chat_template = ProcessorMixin.apply_chat_template

        @classmethod
        def get_attributes(cls):
            return [name for name in processor_class.get_attributes() if name != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__  # what save_pretrained records
    return ImageOnly


def model_config(path: str | Path):
    """A checkpoint's transformers config alone (what a training engine sizes itself by before the model loads)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def load_processor(path: str | Path, model_type: str | None = None):
    """A checkpoint's processor (its family's class) with the PIL image processor and no video processor."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    with hub_errors("processor", path), unreadable_files(Path(path)):
        if model_type is None:
            run = Path(path) / FINETUNE_RUN_FILE  # a LoRA fine-tune holds its adapter; its base, the config
            config_of = read_json(run)["base"] if run.is_file() and not (Path(path) / "config.json").is_file() else path
            model_type = AutoConfig.from_pretrained(config_of).model_type
        processor_class = family_of_model_type(model_type, str(path)).transformers_class("processor_class")
        settings, _ = processor_class.get_processor_dict(path)
        accepted = set(inspect.signature(processor_class.__init__).parameters) - {"self", "args", "kwargs"}
        parts = {
            "image_processor": AutoImageProcessor.from_pretrained(path, backend="pil"),
            "tokenizer": AutoTokenizer.from_pretrained(path),
        }
        if "video_processor" in accepted:
            parts["video_processor"] = None
        kept = {key: value for key, value in settings.items() if key in accepted and key not in parts}
        return image_only(processor_class)(**parts, **kept)


def unreadable_files(folder: Path):
    """A local checkpoint that fails to load (a cut-short safetensors file, a bad JSON) as an error naming it."""
    from safetensors import SafetensorError

    if not folder.is_dir():
        return contextlib.nullcontext()
    return named_on_failure(folder, "loaded", (SafetensorError, OSError, ValueError, EOFError, pickle.UnpicklingError))


def load_target(path: Path, dtype: torch.dtype = torch.float32):
    """A fine-tuned target, ready to generate: a LoRA run's adapter is merged into its base."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        return load_checkpoint(path, dtype)
    from peft import PeftModel

    run = read_json(path / FINETUNE_RUN_FILE)
    model, processor = load_checkpoint(run["base"], dtype)
    return PeftModel.from_pretrained(model, path).merge_and_unload(), processor
