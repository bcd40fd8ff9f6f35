"""Where the proxy's checkpoints fall along its training. No torch: the Snakefile counts them too.

Two cadences: ``checkpoints`` evenly spaced over the whole training (the trajectory length is fixed
whatever the data), or one every ``save_every_steps`` steps as the paper's code saves them (the
count then grows with the data: known once ``prepare`` has counted the usable records).
"""

from __future__ import annotations

import math

from xmas.errors import XmasError


def steps_per_epoch(records: int, batch_size: int) -> int:
    return math.ceil(records / batch_size)


def total_steps(records: int, settings) -> int:
    return settings.epochs * steps_per_epoch(records, settings.batch_size)


def checkpoint_count(records: int, settings) -> int:
    """C, the trajectory length: ``checkpoints``, or one per ``save_every_steps`` (the last at the end).
    ``settings``: the proxy's (train-segment's or merge's, :func:`xmas.settings.settings_class`)."""
    every = settings.save_every_steps
    if not every:
        return settings.checkpoints
    total = total_steps(records, settings)
    count = math.ceil(total / every)
    if count < 2:
        raise XmasError(
            f"training.save_every_steps {every} gives {count} checkpoint over the proxy's {total} steps "
            f"({records} usable records, {settings.epochs} epochs of batches of "
            f"{settings.batch_size}); trajectories need at least 2: save more often"
        )
    return count


def checkpoint_step(checkpoint: int, records: int, settings) -> int:
    """The global step at which checkpoint ``checkpoint`` (1..C) is written; C is the last step."""
    total, every = total_steps(records, settings), settings.save_every_steps
    if every:
        return min(checkpoint * every, total)
    return round(checkpoint * total / settings.checkpoints)
