"""Fine-tuning a target VLM on LLaVA-format records: what ``finetune_target`` (every subset) and
``pretrain_target`` (the alignment on captions, once) run.

Two recipes share this code path:

- ``lora_r: 0``: every parameter is trained, or all but the vision tower (``freeze_vision_tower``),
  or the projector alone (``projector_only``, LLaVA's first stage).
- ``lora_r: R``: the paper's recipe for LLaVA-1.5-7B. LoRA (rank R, alpha) on every linear layer
  of the language model, the projector trained in full at its own learning rate, the vision tower
  frozen. The run saves the adapter (with the projector); evaluation merges it
  (:func:`xmas.models.checkpoints.load_target`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import torch

from xmas.data.records import record_id
from xmas.data.sources import POSITION_COLUMNS, Source, as_source
from xmas.errors import XmasError
from xmas.io import atomic_path, damage_of, read_json, seal_path, verify, write_seal
from xmas.models.checkpoints import FINETUNE_RUN_FILE, load_checkpoint, model_config
from xmas.models.encoding import ConversationEncoder, Encoding
from xmas.models.families import family_of
from xmas.models.recipe import freeze_vision_tower, train_projector_only, with_lora
from xmas.progress import StageStats, log, progress
from xmas.training.engine import (
    Training,
    attention_implementation,
    parameter_count,
    parameters_held,
    resolve_dtype,
    training,
)
from xmas.training.loop import DataOrder, fit_steps, make_optimizer, micro_batches_for
from xmas.training.schedule import steps_per_epoch

LENGTH_BATCH = 1024


def subset_rows(subset: Source) -> pd.DataFrame:
    """Where each record of a subset lies (one pass over it), so records are read on demand."""
    for file in subset.files:
        verify(file)
    rows = [
        {"uid": record_id(found.record, found.index), "index": found.index, **found.position}
        for found in subset.records()
    ]
    return pd.DataFrame(rows, columns=["uid", "index", *POSITION_COLUMNS])


def fitting_records(subset: Source | Path, encoder: ConversationEncoder, stats: StageStats):
    """The subset's records the target can encode with their images within its ``max_length``.

    ``prepare`` checked every record against the proxy; the target's tokenizer, family and image tokens
    may differ, so a record that cannot be encoded whole for the target is left out here and named.
    """
    subset = as_source(subset)
    rows = subset_rows(subset)
    fits = []
    with subset.reader(rows) as records:
        for start in progress(
            range(0, len(records), LENGTH_BATCH),
            total=-(-len(records) // LENGTH_BATCH),
            desc="count tokens",
            unit="batch",
        ):
            batch = records[start : start + LENGTH_BATCH]
            for record, length in zip(batch, encoder.lengths_or_errors(batch)):
                images = encoder.too_many_images(record)
                why = ("too_many_images", images) if images else why_left_out(length, encoder.encoding.max_length)
                fits.append(why is None)
                if why is not None:
                    log.warning("%s: record %r left out: %s", subset.given, record.get("id"), why[1])
                    stats.exclude(why[0])
    return subset.reader(rows[fits])


def why_left_out(length, max_length: int) -> tuple[str, str] | None:
    """(reason, detail) of a subset record the target cannot train on; None when it can."""
    if isinstance(length, str):
        return "not_encodable", length
    if not length.fits(max_length):
        return (
            "image_cut_by_max_length",
            f"its image ends at token {length.image_end}, past the target's max_length {max_length}",
        )
    return None


def prepare_model(base: Path, settings, context, seed: int, projector_only: bool = False):
    """The base target on this process's device, with LoRA when asked (initialised from ``seed``) and the vision
    tower frozen when asked, or (``projector_only``) everything but the projector frozen.

    Without DeepSpeed, LoRA runs keep the frozen base weights in the run's half precision (a 7B model in
    float32 would not fit); what trains (LoRA, projector) stays float32 under autocast. Under DeepSpeed
    the base loads in the run's precision, DeepSpeed keeping float32 master weights, and under ZeRO-3
    every process loads only its partition of it (the stage's :class:`Training`, made before, has set
    that up).
    """
    half = settings.precision != "fp32" and (settings.lora_r or settings.deepspeed)
    dtype = resolve_dtype(settings.precision) if half else torch.float32
    implementation = attention_implementation(
        settings.attn_implementation, context.device, family_of(model_config(base))
    )
    model, processor = load_checkpoint(base, dtype, attn_implementation=implementation)
    log.info(
        "base loaded in %s; this process holds %.0f%% of its %d parameters",
        dtype,
        100 * parameters_held(model.parameters()) / parameter_count(model.parameters()),
        parameter_count(model.parameters()),
    )
    torch.manual_seed(seed)  # LoRA's initialisation
    if settings.lora_r:
        model = with_lora(model, settings.lora_r, settings.lora_alpha, settings.lora_dropout)
    if settings.freeze_vision_tower:
        freeze_vision_tower(model)
    if projector_only:
        train_projector_only(model)
    if settings.deepspeed:
        # DeepSpeed casts the model to the run's precision itself, but not one it holds partitioned (ZeRO-3):
        # the parameters made after loading (LoRA's) must then match the base's.
        for parameter in model.parameters():
            if not hasattr(parameter, "ds_id") and parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)
        return model, processor  # DeepSpeed places the model and keeps its own float32 copies
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model.to(context.device), processor


def finetune(
    base: Path,
    subset: Path | Source,
    image_root: Path | None,
    out: Path,
    settings,
    seed: int,
    stats: StageStats,
    projector_only: bool = False,
) -> None:
    """``epochs`` passes over the subset in the order ``seed`` draws (the proxy's batching and engine), then save.
    ``settings``: the finetune-target stage's (:func:`xmas.settings.settings_class`).

    With ``save_every_steps``, the run's state is saved every that many steps next to ``out``
    (``<out>.partial/``), and a run started again with the same settings resumes from the last one.
    """
    subset = as_source(subset)
    records = fitting_records(subset, ConversationEncoder.of_checkpoint(base, image_root=image_root), stats)
    if not len(records):
        raise XmasError(
            f"{subset.given}: the subset has no records the target can train on; there is nothing to fine-tune"
        )
    order = DataOrder(len(records), settings.batch_size, seed)
    total = settings.epochs * steps_per_epoch(len(records), settings.batch_size)
    identity = {**dataclasses.asdict(settings), "seed": seed, "projector_only": projector_only}  # what resumes
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    with training(settings, model_config(base)) as run, records:
        context = run.context
        model, processor = prepare_model(base, settings, context, seed, projector_only)
        encoder = ConversationEncoder.of_checkpoint(base, processor, image_root, context.device)
        optimizer, scheduler = make_optimizer(model, settings, total, settings.projector_learning_rate)
        run.prepare(model, optimizer, scheduler)
        model.train()
        start, losses = resume(partial, run, identity, total, context)
        every = settings.save_every_steps or total
        for first in range(start, total, every):
            last = min(first + every, total)
            losses += fit_steps(
                run,
                lambda step: micro_batches_for(step, order, records, encoder, settings, context),
                first,
                last,
                context,
                desc=f"fine-tune steps {first + 1}-{last} of {total}",
            )
            if last < total:
                save_partial(partial, run, identity, last, losses, context)
        finished = {
            "base": str(Path(base).resolve()),
            "subset": subset.given,
            "records": len(records),
            "settings": identity,
            "losses": losses,
        }
        save_target(run, processor, encoder.encoding, out, finished, context)
        if context.is_main:
            shutil.rmtree(partial, ignore_errors=True)
    stats.add("in", len(records))
    stats.add("steps", total)
    stats.add("resumed_at_step", start)
    stats.add("out", 1)
    stats.set("processes", context.world_size)
    stats.set("trainable_parameters", parameter_count(p for p in model.parameters() if p.requires_grad))
    stats.set("first_loss", losses[0])
    stats.set("last_loss", losses[-1])


# ------------------------------------------------------------------------------- intermediate states

PARTIAL_SUFFIX = ".partial"
STEP_FILE = "step.json"
STATE_FILE = "state.pt"  # the trainable weights; accelerate's files beside it


def saved_steps(partial: Path) -> list[Path]:
    """The complete intermediate states (their step file is written last), oldest first."""
    found = [folder for folder in partial.glob("step-*") if (folder / STEP_FILE).is_file()]
    return sorted(found, key=lambda folder: int(folder.name.removeprefix("step-")))


def save_partial(partial: Path, run: Training, settings: dict, step: int, losses: list[float], context) -> None:
    """The run's state after ``step`` steps, as accelerate saves it (optimizer, schedule, each process's random
    state; DeepSpeed's and FSDP's shards) with the trainable weights; written into a temporary folder, then
    renamed, so a kill leaves the previous state whole."""
    tmp, folder = partial / f".step-{step}.tmp", partial / f"step-{step}"
    if context.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    context.barrier()
    run.save_state(tmp, trainable_file=STATE_FILE)  # every process takes part
    context.barrier()
    if context.is_main:
        (tmp / STEP_FILE).write_text(json.dumps({"step": step, "losses": losses, "settings": settings}) + "\n")
        write_seal(folder, tmp)
        shutil.rmtree(folder, ignore_errors=True)  # a state not trusted, of a run started again
        tmp.rename(folder)
        for older in saved_steps(partial)[:-1]:
            shutil.rmtree(older)
            seal_path(older).unlink(missing_ok=True)
        log.info("saved the fine-tune's state after step %d in %s", step, folder)
    context.barrier()


def resume(partial: Path, run: Training, settings: dict, total: int, context) -> tuple[int, list[float]]:
    """The step to start from and the losses so far: those of the last saved state of this same run, else 0."""
    found = saved_steps(partial)
    if not found:
        return 0, []
    folder = found[-1]
    damage = damage_of(folder)
    if damage is not None:
        log.warning("%s; starting the fine-tune from step 0", damage.what)
        return 0, []
    saved = read_json(folder / STEP_FILE)
    if saved["settings"] != settings:
        log.warning("%s was saved with other settings; starting the fine-tune from step 0", folder)
        return 0, []
    log.info("resuming from step %d of %d (%s)", saved["step"], total, folder)
    run.load_state(folder, trainable_file=STATE_FILE)
    return saved["step"], saved["losses"]


def save_target(run: Training, processor, encoding: Encoding, out: Path, finished: dict, context) -> None:
    """Rank 0 writes the model (the adapter, for LoRA) and the processor; every rank joins ZeRO-3's and FSDP's
    gather."""
    with atomic_path(out) if context.is_main else contextlib.nullcontext(None) as tmp:
        run.save_model(tmp)
        if context.is_main:
            processor.save_pretrained(tmp)
            encoding.save(tmp)
            (tmp / FINETUNE_RUN_FILE).write_text(json.dumps(finished) + "\n")
    context.barrier()
