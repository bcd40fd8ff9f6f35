"""The fine-tuning recipe, shared by the proxy's training, the target's fine-tunes and the GPU check
(tests/gpu): which parameters train, at which learning rate, where LoRA goes, which labels count.
Where a family keeps its vision tower, projector and language model comes from the family table
(:mod:`xmas.models.families`). It imports torch alone (and peft for LoRA), so the GPU check needs
nothing else of the project's.
"""

from __future__ import annotations

import torch

from xmas.errors import XmasError
from xmas.models.families import Family, family_of

IGNORE_INDEX = -100  # label positions the loss leaves out (transformers' convention)


def within(name: str, path: str) -> bool:
    """Whether a parameter or module name lies under the module path (peft's wrappers put prefixes before it)."""
    return name == path or name.startswith(path + ".") or f".{path}." in name or name.endswith(f".{path}")


def is_projector(name: str, family: Family) -> bool:
    return any(within(name, path) for path in family.projector)


def is_vision_tower(name: str, family: Family) -> bool:
    """The vision tower, but not a projector that lives inside it (Qwen's patch merger)."""
    return within(name, family.vision_tower) and not is_projector(name, family)


def unwrapped(model) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def language_model(model) -> torch.nn.Module:
    path = family_of(model).language_model
    try:
        lm = unwrapped(model).get_submodule(path)
    except AttributeError:
        lm = None
    if not hasattr(lm, "layers"):
        raise XmasError(f"{type(model).__name__}: no language model with decoder layers at {path}")
    return lm


def language_model_linear_layers(model) -> list[str]:
    """Names of the language model's linear layers: where LoRA goes (not lm_head, projector, vision)."""
    lm = language_model(model)
    prefix = next(name for name, module in model.named_modules() if module is lm)
    return sorted(f"{prefix}.{name}" for name, module in lm.named_modules() if isinstance(module, torch.nn.Linear))


def projector_modules(model) -> list[str]:
    """The projector's modules by name, lists of modules (Qwen3-VL's DeepStack mergers) by their items."""
    family = family_of(model)
    found = []
    for path in family.projector:
        module = unwrapped(model).get_submodule(path)
        items = list(module.named_children()) if isinstance(module, torch.nn.ModuleList) else [("", module)]
        found += [f"{path}.{name}" if name else path for name, _ in items]
    return found


def with_lora(model, rank: int, alpha: int, dropout: float):
    """A peft model: LoRA on the language model's linear layers, the projector trained in full."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        target_modules=language_model_linear_layers(model),
        modules_to_save=projector_modules(model),
    )
    return get_peft_model(model, config)


def freeze_vision_tower(model) -> None:
    """Keep the vision tower as it is (found by name, so peft-wrapped models too); its projector still trains."""
    family = family_of(model)
    for name, parameter in model.named_parameters():
        if is_vision_tower(name, family):
            parameter.requires_grad_(False)


def train_projector_only(model) -> None:
    """LLaVA's first stage: the vision tower and the language model stay as they are."""
    family = family_of(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_projector(name, family))


def parameter_groups(
    model, learning_rate: float, projector_learning_rate: float | None, weight_decay: float
) -> list[dict]:
    """Trainable parameters in two groups: the projector at its own learning rate (when given), the rest.
    A module that is no model of a family (no config) has no projector."""
    family = family_of(model) if hasattr(unwrapped(model), "config") else None
    projector, rest = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (projector if family and is_projector(name, family) else rest).append(parameter)
    return [
        group
        for group in (
            {"params": rest, "lr": learning_rate, "weight_decay": weight_decay, "name": "model"},
            {
                "params": projector,
                "lr": projector_learning_rate or learning_rate,
                "weight_decay": weight_decay,
                "name": "projector",
            },
        )
        if group["params"]
    ]
