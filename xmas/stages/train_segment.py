"""Rule ``train_segment``: one segment of proxy training: resume from checkpoint c-1, train to
checkpoint c, save.

Runs in one process or, started by `accelerate launch`, in one process per GPU (DDP or DeepSpeed ZeRO, see
:mod:`xmas.training.engine`): each takes its slice of every global batch, and only rank 0 writes.
The step schedule, learning-rate schedule and data order are functions of the settings and the
global step alone (:mod:`xmas.training.loop`), and the optimizer and scheduler state travel in
every checkpoint, so a chain of segments gives the same weights as one uninterrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from xmas.data.examples import usable_records
from xmas.data.sources import Source, as_source, stage_source
from xmas.errors import XmasError
from xmas.io import atomic_path, load_torch, verify
from xmas.models.checkpoints import load_checkpoint, model_config
from xmas.models.encoding import ConversationEncoder, Encoding
from xmas.models.families import family_of
from xmas.models.recipe import freeze_vision_tower
from xmas.progress import StageStats, add_input_arguments, add_threads_argument, use_threads
from xmas.settings import add_settings, settings_of
from xmas.training.engine import Distributed, Training, attention_implementation, context_from_environment, training
from xmas.training.loop import DataOrder, fit_steps, make_optimizer, micro_batches_for
from xmas.training.schedule import checkpoint_count, checkpoint_step

STATE_FILE = "training_state.pt"  # the step and the settings the chain shares
ACCELERATE_STATE = "accelerate_state"  # optimizer, schedule, random states (and DeepSpeed's or FSDP's shards)
LOG_FILE = "training_log.json"
# How the steps run, not what they compute: these may change between segments (DeepSpeed and FSDP aside,
# whose optimizer states are kept in their own formats). Every other setting must stay as it was.
MAY_CHANGE = {"micro_batch_size", "precision", "gradient_checkpointing", "attn_implementation", "deepspeed", "fsdp"}


def load_state(previous: Path, settings: dict, checkpoint: int) -> dict | None:
    """(``settings``: the segment's, by name, with the usable records' count.)"""
    """The previous segment's training state, checked against the current settings; None for checkpoint 0.

    Only checkpoint 0 (from proxy-init) has none: segment ``checkpoint`` resumes from checkpoint
    ``checkpoint - 1``, so from 2 on it must be there, and a checkpoint with a training log was trained.
    Without it the schedule would restart at step 0 on top of trained weights.
    """
    path = previous / STATE_FILE
    if not path.exists():
        if checkpoint > 1 or (previous / LOG_FILE).exists():
            which = f"checkpoint {checkpoint - 1}" if checkpoint > 1 else f"a trained checkpoint (it has {LOG_FILE})"
            raise XmasError(
                f"{path} is missing: only checkpoint 0 has no training state, and {previous} is {which}; "
                f"segment {checkpoint} would restart the schedule at step 0 on its trained weights. "
                f"To train it anew, delete {previous} and run snakemake again"
            )
        return None
    state = load_torch(path, weights_only=False)
    changed = {
        key: (state["settings"].get(key), value)
        for key, value in settings.items()
        if key not in MAY_CHANGE and state["settings"].get(key) != value
    }
    if changed:
        detail = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise XmasError(
            f"{previous} was trained with other settings ({detail}); "
            "delete the proxy checkpoints to train again from checkpoint 0"
        )
    return state


def load_model(previous: Path, settings, device: torch.device):
    """The previous checkpoint in float32 (the master weights), with the requested attention."""
    family = family_of(model_config(previous))
    implementation = attention_implementation(settings.attn_implementation, device, family)
    model, processor = load_checkpoint(previous, attn_implementation=implementation)
    return model.to(device), processor


def train_segment(
    previous: Path,
    out: Path,
    checkpoint: int,
    settings,
    examples: Path,
    source: Source | Path,
    image_root: Path | None,
    stats: StageStats,
) -> None:
    """``settings``: the train-segment stage's (:func:`xmas.settings.settings_class`)."""
    records = usable_records(examples, as_source(source))
    if not records:
        raise XmasError(f"{examples}: no usable records to train on")
    count = checkpoint_count(len(records), settings)
    if not 1 <= checkpoint <= count:
        raise XmasError(f"--checkpoint must be in 1..{count} (the proxy's checkpoints), got {checkpoint}")
    run = {**dataclasses.asdict(settings), "records": len(records)}  # what a chain of segments must share
    state = load_state(verify(previous), run, checkpoint)
    with training(settings, model_config(previous)) as engine:
        context = engine.context
        model, processor = load_model(previous, settings, context.device)
        encoder = ConversationEncoder.of_checkpoint(previous, processor, image_root, context.device)
        total = checkpoint_step(count, len(records), settings)
        start, stop = 0, checkpoint_step(checkpoint, len(records), settings)
        if settings.freeze_vision_tower:
            freeze_vision_tower(model)
        optimizer, scheduler = make_optimizer(model, settings, total)
        order = DataOrder(len(records), settings.batch_size, settings.seed)
        engine.prepare(model, optimizer, scheduler)
        if state is not None:
            start = state["step"]
            engine.load_state(previous / ACCELERATE_STATE)
        if start > stop:
            raise XmasError(f"{previous} is at step {start}, past checkpoint {checkpoint} (step {stop})")
        model.train()
        losses = fit_steps(
            engine,
            lambda step: micro_batches_for(step, order, records, encoder, settings, context),
            start,
            stop,
            context,
            desc=f"train to checkpoint {checkpoint}",
        )
        save_segment(engine, processor, encoder.encoding, out, {"step": stop, "settings": run}, start, losses, context)
    stats.add("steps", stop - start)
    stats.add("in", len(records))
    stats.set("step", stop)
    stats.set("total_steps", total)
    stats.set("processes", context.world_size)
    stats.set("mean_loss", round(float(np.mean(losses)), 6) if losses else None)


def save_segment(
    engine: Training,
    processor,
    encoding: Encoding,
    out: Path,
    state: dict,
    start: int,
    losses: list[float],
    context: Distributed,
) -> None:
    """Every rank takes part in gathering sharded state; rank 0 alone writes, then renames atomically."""
    shared = out.with_name(f".{out.name}.rank-shared")  # every rank writes its random state (and its shards)
    if context.is_main and shared.exists():
        shutil.rmtree(shared)
    context.barrier()
    engine.save_state(shared)  # the weights are the checkpoint's own
    with atomic_path(out) if context.is_main else contextlib.nullcontext(shared) as tmp:
        engine.save_model(tmp)
        context.barrier()
        if context.is_main:
            processor.save_pretrained(tmp)
            encoding.save(tmp)
            shutil.move(str(shared), tmp / ACCELERATE_STATE)
            torch.save(state, tmp / STATE_FILE)
            (tmp / LOG_FILE).write_text(json.dumps({"first_step": start, "losses": losses}) + "\n")
    if context.is_main and shared.exists():
        shutil.rmtree(shared)
    context.barrier()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--previous", required=True, type=Path, help="checkpoint to resume from (checkpoint-{c-1})")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write (checkpoint-{c})")
    parser.add_argument("--checkpoint", required=True, type=int, help="c: which checkpoint this segment ends at (1..C)")
    add_input_arguments(parser, "examples", "annotations", "image_root")
    add_threads_argument(parser)
    add_settings(parser, "train-segment")


def run(args: argparse.Namespace) -> None:
    use_threads(args.threads)
    stats = StageStats(f"train-segment {args.checkpoint}")
    settings = settings_of(args, "train-segment")
    train_segment(
        args.previous,
        args.out,
        args.checkpoint,
        settings,
        args.examples,
        stage_source(args.annotations, settings),
        args.image_root,
        stats,
    )
    stats.finish(args.stats if context_from_environment().is_main else None)
