"""Selection rules of the methods XMAS is compared with, on features a stage has computed (numpy in, indices
out; no model, no files): COINCIDE (:mod:`xmas.selection.coincide`) and SemDeDup
(:mod:`xmas.selection.semdedup`), as their authors' code (G-JWLee/COINCIDE_code) implements them.

Each feature of :data:`xmas.methods.FEATURES` has its module here, named after it, whose ``choose`` the sample
stage calls: ``choose(features, clusters, centroids, budget, metadata, settings) -> Choice``.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import numpy as np


class Choice(NamedTuple):
    chosen: np.ndarray  # the rows selected, in the rule's order
    reasons: np.ndarray  # why each row not chosen was not (one per row; the chosen rows' are ignored)
    stats: dict  # what the rule found that the job's stats record (SemDeDup's eps)


def rule_of(feature: str):
    """The module of a feature's selection rule (xmas/selection/<feature>.py)."""
    return importlib.import_module(f"{__name__}.{feature}")
