"""Where the proxy's checkpoints fall: evenly spaced, or every save_every_steps as the paper's code."""

from __future__ import annotations

import pytest

from xmas.errors import XmasError
from xmas.settings import stage_defaults
from xmas.training.schedule import checkpoint_count, checkpoint_step


def test_checkpoints_are_spread_over_the_steps():
    settings = stage_defaults("merge", batch_size=32, epochs=2, checkpoints=3, save_every_steps=None)
    assert checkpoint_count(100, settings) == 3
    assert [checkpoint_step(c, 100, settings) for c in (1, 2, 3)] == [3, 5, 8]


def test_save_every_steps_gives_the_papers_cadence_the_last_checkpoint_at_the_end():
    # upstream: every 200 steps at a global batch of 32, one epoch of LLaVA-665k's 665,298 records
    settings = stage_defaults("merge", batch_size=32, epochs=1, save_every_steps=200)
    assert checkpoint_count(665_298, settings) == 104
    assert [checkpoint_step(c, 665_298, settings) for c in (1, 2, 103, 104)] == [200, 400, 20_600, 20_791]


def test_a_cadence_that_leaves_one_checkpoint_is_refused():
    with pytest.raises(XmasError, match="save_every_steps 50 gives 1 checkpoint over the proxy's 4 steps"):
        checkpoint_count(100, stage_defaults("merge", batch_size=32, epochs=1, save_every_steps=50))
