"""Fine-tune the target VLM on one subset: the measure of whether a subset is any good.

The base target is checkpoint 0 of a target preset (``resources/target_presets.yaml``), built once
by ``xmas proxy-init --presets resources/target_presets.yaml``. Every subset, budget and seed is
fine-tuned from that same base with the same recipe, so the subsets are the only difference.

Two recipes share this code path:

- ``--lora-r 0``: every parameter is trained (the demo's tiny target, which starts from random
  weights, trains its vision tower too: ``--no-freeze-vision-tower``).
- ``--lora-r R``: the paper's recipe for LLaVA-1.5-7B. LoRA (rank R, alpha) on every linear layer
  of the language model, the projector trained in full at its own learning rate, the vision tower
  frozen. The run saves the adapter (with the projector); ``load_target`` merges it for evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path

import pandas as pd
import torch

from xmas.annotations import SourceRecords, iter_spans
from xmas.encoding import ConversationEncoder, Encoding
from xmas.engine import (ATTENTION_CHOICES, DEEPSPEED_PRESETS, PRECISIONS, attention_implementation,
                         context_from_environment, distributed, fit_steps, prepare_training, resolve_dtype)
from xmas.errors import XmasError
from xmas.io import atomic_path
from xmas.proxy import load_checkpoint
from xmas.records import record_id
from xmas.stage import StageStats, log, progress
from xmas.train import micro_batches_for, quietly, steps_per_epoch

PROJECTOR = "multi_modal_projector"
RUN_FILE = "xmas_finetune.json"


LENGTH_BATCH = 1024


def subset_rows(path: Path) -> pd.DataFrame:
    """Where each record of a subset JSON lies (one pass over the file), so records are read on demand."""
    rows = [(record_id(span.record, span.index), span.index, span.offset, span.length) for span in iter_spans(path)]
    return pd.DataFrame(rows, columns=["uid", "index", "offset", "length"])


def fitting_records(subset: Path, encoder: ConversationEncoder, stats: StageStats) -> SourceRecords:
    """The subset's records whose images fit in the target's ``max_length``.

    ``prepare`` checked every record against the proxy; the target's tokenizer and image tokens may
    differ, so a record that cannot be encoded whole for the target is left out here and named.
    """
    rows = subset_rows(subset)
    fits = []
    with SourceRecords(subset, rows) as records:
        for start in progress(range(0, len(records), LENGTH_BATCH), total=-(-len(records) // LENGTH_BATCH),
                              desc="count tokens", unit="batch"):
            batch = records[start : start + LENGTH_BATCH]
            for record, length in zip(batch, encoder.lengths(batch)):
                fits.append(length.fits(encoder.encoding.max_length))
                if not fits[-1]:
                    log.warning("%s: record %r left out: its image ends at token %d, past the target's max_length %d",
                                subset, record.get("id"), length.image_end, encoder.encoding.max_length)
                    stats.exclude("image_cut_by_max_length")
    return SourceRecords(subset, rows[fits])


def language_model_linear_layers(model) -> list[str]:
    """Names of the language model's linear layers: where LLaVA's recipe puts LoRA (not lm_head, projector, vision)."""
    from xmas.attention import language_model

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
    for name, parameter in model.named_parameters():
        if "vision_tower" in name:
            parameter.requires_grad_(False)


def parameter_groups(model, learning_rate: float, projector_learning_rate: float, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: the projector at its own learning rate, everything else."""
    projector, rest = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (projector if PROJECTOR in name else rest).append(parameter)
    return [group for group in (
        {"params": rest, "lr": learning_rate, "weight_decay": weight_decay, "name": "model"},
        {"params": projector, "lr": projector_learning_rate, "weight_decay": weight_decay, "name": "projector"},
    ) if group["params"]]


def prepare_model(base: Path, settings: dict, device: torch.device):
    """The base target on ``device``, with LoRA when asked and the vision tower frozen when asked.

    LoRA runs keep the frozen base weights in the run's half precision (a 7B model in float32 would
    not fit); what trains (LoRA, projector) stays float32 under autocast. DeepSpeed casts itself.
    """
    half = settings["lora_r"] and settings["precision"] != "fp32" and not settings["deepspeed"]
    implementation = attention_implementation(settings["attn_implementation"], device)
    model, processor = load_checkpoint(base, resolve_dtype(settings["precision"]) if half else torch.float32,
                                       attn_implementation=implementation)
    torch.manual_seed(settings["seed"])  # LoRA's initialisation
    if settings["lora_r"]:
        model = with_lora(model, settings["lora_r"], settings["lora_alpha"], settings["lora_dropout"])
    if settings["freeze_vision_tower"]:
        freeze_vision_tower(model)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model.to(device), processor


def make_optimizer(model, settings: dict, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup

    groups = parameter_groups(model, settings["learning_rate"], settings["projector_learning_rate"],
                              settings["weight_decay"])
    optimizer = torch.optim.AdamW(groups)
    warmup = math.ceil(settings["warmup_ratio"] * total_steps)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def finetune(base: Path, subset: Path, image_root: Path, out: Path, settings: dict, stats: StageStats) -> None:
    """``epochs`` passes over the subset in seeded order (the proxy's batching and engine), then save."""
    records = fitting_records(subset, ConversationEncoder.of_checkpoint(base), stats)
    if not len(records):
        raise XmasError(f"{subset}: the subset has no records the target can train on; there is nothing to fine-tune")
    schedule = {**settings, "records": len(records)}
    total = settings["epochs"] * steps_per_epoch(len(records), settings["batch_size"])
    with distributed() as context, records:
        model, processor = prepare_model(base, settings, context.device)
        encoder = ConversationEncoder.of_checkpoint(base, processor, image_root, context.device)
        optimizer, scheduler = make_optimizer(model, settings, total)
        training = prepare_training(model, optimizer, scheduler, context, settings)
        model.train()
        losses = fit_steps(training, lambda step: micro_batches_for(step, records, encoder, schedule, context),
                           0, total, context, progress if context.is_main else quietly, desc="fine-tune")
        run = {"base": str(Path(base).resolve()), "subset": str(subset), "records": len(records),
               "settings": settings, "losses": losses}
        save_target(training, processor, encoder.encoding, out, run, context)
    stats.add("in", len(records))
    stats.add("steps", total)
    stats.add("out", 1)
    stats.set("processes", context.world_size)
    stats.set("trainable_parameters", sum(p.numel() for p in model.parameters() if p.requires_grad))
    stats.set("first_loss", losses[0])
    stats.set("last_loss", losses[-1])


def save_target(training, processor, encoding: Encoding, out: Path, run: dict, context) -> None:
    """Rank 0 writes the model (the adapter, for LoRA) and the processor; every rank joins ZeRO-3's gather."""
    with atomic_path(out) if context.is_main else contextlib.nullcontext(None) as tmp:
        training.save_model(tmp)
        if context.is_main:
            processor.save_pretrained(tmp)
            encoding.save(tmp)
            (tmp / RUN_FILE).write_text(json.dumps(run) + "\n")
    context.barrier()


def load_target(path: Path, dtype: torch.dtype = torch.float32):
    """A fine-tuned target, ready to generate: a LoRA run's adapter is merged into its base."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        return load_checkpoint(path, dtype)
    from peft import PeftModel

    run = json.loads((path / RUN_FILE).read_text())
    model, processor = load_checkpoint(run["base"], dtype)
    return PeftModel.from_pretrained(model, path).merge_and_unload(), processor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, type=Path, help="the target's checkpoint 0 (from `xmas proxy-init`)")
    parser.add_argument("--subset", required=True, type=Path, help="subset JSON (LLaVA format) to fine-tune on")
    parser.add_argument("--image-root", required=True, type=Path, help="folder the records' image paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the fine-tuned target to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and the LoRA initialisation")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the subset (paper: 1)")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size (paper: 128)")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="paper: 2e-4 with LoRA")
    parser.add_argument("--projector-learning-rate", type=float, default=2e-5, help="paper: 2e-5")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lora-r", type=int, default=128, help="LoRA rank; 0 trains all weights (paper: 128)")
    parser.add_argument("--lora-alpha", type=int, default=256, help="paper: 256")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--freeze-vision-tower", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the vision tower as it is (paper; default on)")
    gpu = parser.add_argument_group("GPU training (as for the proxy: `xmas train-segment --help`)")
    gpu.add_argument("--micro-batch-size", type=int, default=None,
                     help="examples per forward/backward on one process (paper: 16 per GPU)")
    gpu.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="paper: bf16")
    gpu.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    gpu.add_argument("--attn-implementation", choices=ATTENTION_CHOICES, default="auto",
                     help="auto: flash-attn 2 on CUDA when installed, else SDPA")
    gpu.add_argument("--deepspeed", default=None,
                     help=f"DeepSpeed ZeRO: {' or '.join(DEEPSPEED_PRESETS)} (resources/deepspeed/) or a JSON file "
                          "(paper: zero3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


SETTINGS = ("seed", "epochs", "batch_size", "learning_rate", "projector_learning_rate", "weight_decay",
            "warmup_ratio", "max_grad_norm", "lora_r", "lora_alpha", "lora_dropout",
            "freeze_vision_tower", "micro_batch_size", "precision", "gradient_checkpointing",
            "attn_implementation", "deepspeed")


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lora_r < 0:
        raise XmasError(f"--lora-r must be 0 (no LoRA) or a positive rank, got {args.lora_r}")
    stats = StageStats(f"finetune {args.out}")
    finetune(args.base, args.subset, args.image_root, args.out, {key: getattr(args, key) for key in SETTINGS}, stats)
    stats.finish(args.stats if context_from_environment().is_main else None)
