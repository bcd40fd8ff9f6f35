"""One segment of proxy training: resume from the previous checkpoint, train to checkpoint c, save.

Runs in one process or, started by torchrun, in one process per GPU (DDP or DeepSpeed ZeRO, see
:mod:`xmas.engine`): each takes its slice of every global batch, and only rank 0 writes.

The step schedule, learning-rate schedule and data order are functions of the settings and
the global step alone, and the optimizer and scheduler state travel in every checkpoint, so a
chain of segments gives the same weights as one uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from xmas.encoding import ConversationEncoder, Encoding
from xmas.engine import (ATTENTION_CHOICES, DEEPSPEED_PRESETS, PRECISIONS, Distributed, MicroBatch,
                         attention_implementation, context_from_environment, distributed, fit_steps, prepare_training, rank_micro_batches)
from xmas.errors import XmasError
from xmas.io import atomic_path
from xmas.proxy import load_checkpoint, training_records
from xmas.stage import StageStats, add_input_arguments, progress

STATE_FILE = "training_state.pt"
SCHEDULE_KEYS = ("records", "epochs", "batch_size", "checkpoints", "seed", "learning_rate", "weight_decay",
                 "warmup_ratio", "max_grad_norm", "freeze_vision_tower")
# How the steps run, not what they compute: these may change between segments (DeepSpeed aside,
# whose optimizer state is kept in its own format).
ENGINE_KEYS = ("micro_batch_size", "precision", "gradient_checkpointing", "attn_implementation", "deepspeed")


def steps_per_epoch(records: int, batch_size: int) -> int:
    return math.ceil(records / batch_size)


def checkpoint_step(checkpoint: int, settings: dict) -> int:
    """The global step at which checkpoint ``checkpoint`` (1..C) is written; C is the last step."""
    total = settings["epochs"] * steps_per_epoch(settings["records"], settings["batch_size"])
    return round(checkpoint * total / settings["checkpoints"])


def batch_indices(step: int, settings: dict) -> np.ndarray:
    """Record positions of global step ``step``: a seeded permutation per epoch, cut into batches."""
    per_epoch = steps_per_epoch(settings["records"], settings["batch_size"])
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([settings["seed"], epoch]).permutation(settings["records"])
    return order[offset * settings["batch_size"] : (offset + 1) * settings["batch_size"]]


def trainable_parameters(model, freeze_vision_tower: bool) -> list[torch.nn.Parameter]:
    vision = getattr(getattr(model, "model", model), "vision_tower", None)
    if freeze_vision_tower and vision is not None:
        vision.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model, settings: dict, total_steps: int):
    from transformers import get_cosine_schedule_with_warmup

    parameters = trainable_parameters(model, settings["freeze_vision_tower"])
    optimizer = torch.optim.AdamW(parameters, lr=settings["learning_rate"], weight_decay=settings["weight_decay"])
    warmup = math.ceil(settings["warmup_ratio"] * total_steps)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def load_state(previous: Path, settings: dict) -> dict | None:
    """The previous segment's training state, checked against the current settings (None at checkpoint 0)."""
    path = previous / STATE_FILE
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    changed = {key: (state["settings"].get(key), settings[key]) for key in SCHEDULE_KEYS
               if state["settings"].get(key) != settings[key]}
    if changed:
        detail = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise XmasError(f"{previous} was trained with other settings ({detail}); "
                        "delete the proxy checkpoints to train again from checkpoint 0")
    return state


def micro_batches_for(step: int, records, encoder: ConversationEncoder, settings: dict,
                      context: Distributed) -> list[MicroBatch]:
    """This rank's micro-batches of global step ``step``; an empty share becomes a weight-0 filler."""
    indices = batch_indices(step, settings)
    shares = rank_micro_batches(indices, context.rank, context.world_size, settings.get("micro_batch_size"))
    return [MicroBatch(encoder([records[i] for i in share])) if len(share)
            else MicroBatch(encoder([records[indices[0]]]), weight=0.0) for share in shares]


def quietly(items, **_):
    return items


def load_model(previous: Path, settings: dict, device: torch.device):
    """The previous checkpoint in float32 (the master weights), with the requested attention."""
    implementation = attention_implementation(settings.get("attn_implementation", "auto"), device)
    model, processor = load_checkpoint(previous, attn_implementation=implementation)
    return model.to(device), processor


def train_segment(previous: Path, out: Path, checkpoint: int, settings: dict, examples: Path, annotations: Path,
                  image_root: Path, stats: StageStats) -> None:
    records = training_records(examples, annotations)
    settings = {**settings, "records": len(records)}
    if not records:
        raise XmasError(f"{examples}: no usable records to train on")
    with distributed() as context:
        model, processor = load_model(previous, settings, context.device)
        encoder = ConversationEncoder.of_checkpoint(previous, processor, image_root, context.device)
        total = checkpoint_step(settings["checkpoints"], settings)
        start, stop = 0, checkpoint_step(checkpoint, settings)
        optimizer, scheduler = make_optimizer(model, settings, total)
        training = prepare_training(model, optimizer, scheduler, context, settings)
        state = load_state(previous, settings)
        if state is not None:
            start = state["step"]
            training.load_state_dict(state, previous)
        if start > stop:
            raise XmasError(f"{previous} is at step {start}, past checkpoint {checkpoint} (step {stop})")
        model.train()
        losses = fit_steps(training, lambda step: micro_batches_for(step, records, encoder, settings, context),
                           start, stop, context, progress if context.is_main else quietly,
                           desc=f"train to checkpoint {checkpoint}")
        save_segment(training, processor, encoder.encoding, out, {"step": stop, "settings": settings}, start, losses, context)
    stats.add("steps", stop - start)
    stats.add("in", len(records))
    stats.set("step", stop)
    stats.set("total_steps", total)
    stats.set("processes", context.world_size)
    stats.set("mean_loss", round(float(np.mean(losses)), 6) if losses else None)


def save_segment(training, processor, encoding: Encoding, out: Path, state: dict, start: int, losses: list[float],
                 context: Distributed) -> None:
    """Every rank takes part in gathering sharded state; rank 0 alone writes, then renames atomically."""
    shared = out.with_name(f".{out.name}.rank-shared")  # DeepSpeed writes its shards from every rank
    if context.is_main and shared.exists():
        shutil.rmtree(shared)
    context.barrier()
    extra_state = training.save_state(shared)
    with atomic_path(out) if context.is_main else contextlib.nullcontext(shared) as tmp:
        training.save_model(tmp)
        context.barrier()
        if context.is_main:
            processor.save_pretrained(tmp)
            encoding.save(tmp)
            for item in shared.iterdir() if shared.exists() else []:
                shutil.move(str(item), tmp / item.name)
            torch.save({**state, **extra_state}, tmp / STATE_FILE)
            (tmp / "training_log.json").write_text(json.dumps({"first_step": start, "losses": losses}) + "\n")
    if context.is_main and shared.exists():
        shutil.rmtree(shared)
    context.barrier()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--previous", required=True, type=Path, help="checkpoint to resume from (checkpoint-{c-1})")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write (checkpoint-{c})")
    parser.add_argument("--checkpoint", required=True, type=int, help="c: which checkpoint this segment ends at (1..C)")
    parser.add_argument("--checkpoints", required=True, type=int, help="C: number of checkpoints over the whole run")
    add_input_arguments(parser, "examples", "annotations", "image_root")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-ratio", type=float, default=0.03)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--freeze-vision-tower", action=argparse.BooleanOptionalAction, default=True,
                        help="train only projector and language model, as in the paper (default on)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="examples per forward/backward on one process (gradient accumulation); "
                        "default: the process's whole share of the batch")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                        help="fp32, or bf16/fp16 mixed precision over fp32 weights (default fp32)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="recompute activations in backward to save memory")
    parser.add_argument("--attn-implementation", choices=ATTENTION_CHOICES, default="auto",
                        help="auto: flash-attn 2 on CUDA when installed, else SDPA")
    parser.add_argument("--deepspeed", default=None,
                        help=f"DeepSpeed ZeRO: {' or '.join(DEEPSPEED_PRESETS)} (resources/deepspeed/) or a JSON file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> None:
    if not 1 <= args.checkpoint <= args.checkpoints:
        raise XmasError(f"--checkpoint must be in 1..{args.checkpoints}, got {args.checkpoint}")
    if args.threads:
        torch.set_num_threads(args.threads)
    stats = StageStats(f"train-segment {args.checkpoint}")
    settings = {key: getattr(args, key) for key in (*SCHEDULE_KEYS, *ENGINE_KEYS) if key != "records"}
    train_segment(args.previous, args.out, args.checkpoint, settings, args.examples, args.annotations,
                  args.image_root, stats)
    stats.finish(args.stats if context_from_environment().is_main else None)
