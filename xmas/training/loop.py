"""The training loop proxy segments and target fine-tunes share: the data order, the steps of a
global batch across processes and micro-batches, the optimizer and its schedule.

Every step's loss is the token mean over the whole global batch, whatever the number of
processes and micro-batches: each micro-batch's summed loss is divided by the global count of
label tokens (transformers' ``num_items_in_batch``), so gradients add up to those of one
process taking the whole batch at once. The data order and the learning-rate schedule are
functions of the settings and the global step alone, so a run cut into segments equals one run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from xmas.models.encoding import ConversationEncoder
from xmas.models.recipe import IGNORE_INDEX, parameter_groups
from xmas.progress import progress
from xmas.training.engine import Distributed, MicroBatch, sharded
from xmas.training.schedule import steps_per_epoch


@dataclasses.dataclass(frozen=True)
class DataOrder:
    """Which records each global step takes: a seeded permutation per epoch, cut into global batches."""

    records: int
    batch_size: int
    seed: int

    def indices(self, step: int) -> np.ndarray:
        """Record positions of global step ``step``."""
        epoch, offset = divmod(step, steps_per_epoch(self.records, self.batch_size))
        order = np.random.default_rng([self.seed, epoch]).permutation(self.records)
        return order[offset * self.batch_size : (offset + 1) * self.batch_size]


def rank_micro_batches(
    indices: np.ndarray, rank: int, world_size: int, micro_batch_size: int | None
) -> list[np.ndarray]:
    """This rank's share of a global batch, cut into as many micro-batches as every other rank gets.

    Ranks take contiguous slices; an empty micro-batch means "run a weight-0 filler", so DDP and
    DeepSpeed see the same number of forward/backward calls on every rank.
    """
    per_rank = math.ceil(len(indices) / world_size)
    count = 1 if not micro_batch_size else max(1, math.ceil(per_rank / micro_batch_size))
    mine = np.array_split(indices, world_size)[rank]
    return np.array_split(mine, count)


def label_tokens(inputs: dict[str, torch.Tensor]) -> int:
    """Tokens that count in the causal-LM loss: labels shifted by one, ignored positions dropped."""
    return int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())


def micro_batches_for(
    step: int, order: DataOrder, records, encoder: ConversationEncoder, settings, context: Distributed
) -> list[MicroBatch]:
    """This rank's micro-batches of global step ``step``; an empty share becomes a weight-0 filler.
    ``settings``: the training stage's (its micro_batch_size, deepspeed and fsdp)."""
    indices = order.indices(step)
    shares = rank_micro_batches(indices, context.rank, context.world_size, settings.micro_batch_size)
    with_an_image = sharded(settings)
    return [
        MicroBatch(encode_share(encoder, [records[i] for i in share], with_an_image))
        if len(share)
        else MicroBatch(encode_share(encoder, [records[indices[0]]], with_an_image), weight=0.0)
        for share in shares
    ]


def encode_share(encoder: ConversationEncoder, share: list[dict], with_an_image: bool) -> dict[str, torch.Tensor]:
    """The share's inputs. ``with_an_image``: a share without images gets one more row, a blank image with
    nothing labelled. DeepSpeed gathers (ZeRO-3) and reduces (ZeRO-2), and FSDP gathers, the parameters of
    the modules that ran, in step across the processes, so every process must run the vision tower and
    projector in every micro-batch; the row adds nothing to the loss and zeros to their gradients (LLaVA's
    trainer likewise runs text-only samples through an empty slice of image features)."""
    items = [encoder.encode(record, with_labels=True) for record in share]
    if with_an_image and not any("pixel_values" in item for item in items):
        items.append(encoder.filler_with_an_image())
    return encoder.collate(items)


# The schedules after the linear warmup, by their transformers names.
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def make_optimizer(model, settings, total_steps: int, projector_learning_rate: float | None = None):
    """AdamW over the trainable parameters, the projector at ``projector_learning_rate`` (None: the
    learning rate); linear warmup, then the ``lr_schedule`` of ``settings`` (the training stage's)."""
    from transformers import get_scheduler

    groups = parameter_groups(model, settings.learning_rate, projector_learning_rate, settings.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    warmup = math.ceil(settings.warmup_ratio * total_steps)
    schedule = get_scheduler(
        SCHEDULES[settings.lr_schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    return optimizer, schedule


def fit_steps(
    training,
    batches_for_step: Callable[[int], list[MicroBatch]],
    start: int,
    stop: int,
    context: Distributed,
    desc: str = "train",
) -> list[float]:
    """Global steps ``start..stop-1``; returns each step's loss (token mean over the global batch).
    Rank 0 reports progress."""
    losses = []
    steps = range(start, stop)
    for step in progress(steps, total=len(steps), desc=desc, unit="step") if context.is_main else steps:
        micro_batches = batches_for_step(step)
        local_items = sum(label_tokens(micro.inputs) for micro in micro_batches if micro.weight)
        items = context.sum(float(local_items)).clamp(min=1).to(torch.float32)
        loss = training.train_step(micro_batches, items)
        losses.append(round(float(context.sum(loss)), 6))
    return losses
