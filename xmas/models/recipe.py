"""LLaVA-1.5's fine-tuning recipe, shared by the proxy's training, the target's fine-tunes and the GPU
check (tests/gpu): which parameters train, at which learning rate, where LoRA goes, which labels count.
It imports torch alone (and peft for LoRA), so the GPU check needs nothing else of the project's.
"""

from __future__ import annotations

import torch

from xmas.errors import XmasError

IGNORE_INDEX = -100  # label positions the loss leaves out (transformers' convention)
PROJECTOR = "multi_modal_projector"


def language_model(model) -> torch.nn.Module:
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise XmasError(f"{type(model).__name__}: no language model with decoder layers found")
    return lm


def language_model_linear_layers(model) -> list[str]:
    """Names of the language model's linear layers: where LLaVA's recipe puts LoRA (not lm_head, projector, vision)."""
    lm = language_model(model)
    prefix = next(name for name, module in model.named_modules() if module is lm)
    return sorted(f"{prefix}.{name}" for name, module in lm.named_modules() if isinstance(module, torch.nn.Linear))


def with_lora(model, rank: int, alpha: int, dropout: float):
    """A peft model: LoRA on the language model's linear layers, the projector trained in full."""
    from peft import LoraConfig, get_peft_model

    if not hasattr(getattr(model, "model", model), PROJECTOR):
        raise XmasError(f"{type(model).__name__} has no {PROJECTOR}: LoRA fine-tuning expects a Llava-family model")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=language_model_linear_layers(model), modules_to_save=[PROJECTOR])
    return get_peft_model(model, config)


def freeze_vision_tower(model) -> None:
    """Keep the vision tower as it is (found by name, so peft-wrapped models too)."""
    for name, parameter in model.named_parameters():
        if "vision_tower" in name:
            parameter.requires_grad_(False)


def train_projector_only(model) -> None:
    """LLaVA's first stage: the vision tower and the language model stay as they are."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(PROJECTOR in name)


def parameter_groups(model, learning_rate: float, projector_learning_rate: float | None,
                     weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: the projector at its own learning rate (when given), the rest."""
    projector, rest = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (projector if PROJECTOR in name else rest).append(parameter)
    return [group for group in (
        {"params": rest, "lr": learning_rate, "weight_decay": weight_decay, "name": "model"},
        {"params": projector, "lr": projector_learning_rate or learning_rate, "weight_decay": weight_decay,
         "name": "projector"},
    ) if group["params"]]
