"""Checkpoint folders: a standard Hugging Face folder (``save_pretrained`` of model and processor,
loadable with ``AutoModelForImageTextToText`` and ``AutoProcessor``) plus ``xmas_encoding.json``
(:class:`xmas.models.encoding.Encoding`). A LoRA fine-tune's folder holds the adapter and names
its base in ``xmas_finetune.json``."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch

from xmas.errors import XmasError
from xmas.io import named_on_failure, read_json, verify

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
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise XmasError(f"{path} is not a model checkpoint (no config.json)")
    verify(path)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with hub_errors("model", path), unreadable_files(Path(path)):
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        return model, AutoProcessor.from_pretrained(path)


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
