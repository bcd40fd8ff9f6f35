"""The selection methods, each declared once: what it samples from and how.

``xmas sample`` dispatches on these declarations, the workflow derives each method's inputs and
seeds from them, and a test holds the config schema's list of methods to this one. Adding a method
is one entry here (on a new feature, also that feature's rule, ``xmas/selection/<feature>.py``) plus its
test: the schema's ``selection.methods`` takes any name declared here (the workflow checks it, and
docs/configuration.md lists them). Imports nothing heavy: the workflow reads it while it builds the DAG.
"""

from __future__ import annotations

import dataclasses

from xmas.errors import XmasError

SIGNALS = ("attention", "loss")  # what a trajectory job records per example and checkpoint (xmas trajectory)
INSIDE_CLUSTERS = ("stability", "random")
FEATURES = ("coincide", "semdedup")  # what a features job records per example (xmas features), by the method using it


def signal_prefix(signal: str) -> str:
    """Where a signal's outputs go under results/ and its logs under logs/ (and logs/stats/): at the top for
    XMAS's attention, under ``<signal>/`` for the others."""
    return "" if signal == "attention" else f"{signal}/"


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str
    # The signal whose trajectories' clusters it samples from (balanced over the clusters); None: no clusters.
    signal: str | None = None
    # The reference VLM's feature whose clusters it selects from, by its own rule (xmas/selection/<it>.py).
    features: str | None = None
    inside_clusters: str | None = None  # stability: the most stable first; random: a seeded draw
    text_only_share: str | None = None  # fixed here (proportional), else the setting selection.text_only_share
    # A new subset per evaluation seed (the draw is what it measures); otherwise selection.seed fixes it.
    seeded: bool = False
    every_record: bool = False  # every usable record (the reference), whatever the budget says
    evaluated_only: bool = False  # not a selection of its own: the evaluation adds it, not selection.methods

    def __post_init__(self):
        if self.signal is not None and (self.signal not in SIGNALS or self.inside_clusters not in INSIDE_CLUSTERS):
            raise ValueError(
                f"method {self.name}: signal {self.signal!r} and inside_clusters "
                f"{self.inside_clusters!r} must be one of {SIGNALS} and {INSIDE_CLUSTERS}"
            )
        if self.features is not None and (self.features not in FEATURES or self.signal is not None):
            raise ValueError(
                f"method {self.name}: features {self.features!r} must be one of {FEATURES}, without a signal"
            )


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "xmas",
            "balanced over the clusters of attention trajectories, the most stable examples first",
            signal="attention",
            inside_clusters="stability",
        ),
        Method(
            "xmas-proportional",
            "xmas, the text-only records keeping their share of the usable records",
            signal="attention",
            inside_clusters="stability",
            text_only_share="proportional",
        ),
        Method(
            "loss",
            "xmas's rule on the clusters of per-example loss trajectories (the paper's other signal)",
            signal="loss",
            inside_clusters="stability",
        ),
        Method(
            "cluster-random",
            "xmas's clusters and quotas, a random draw inside each cluster (isolates the stability rule)",
            signal="attention",
            inside_clusters="random",
            seeded=True,
        ),
        Method("random", "a uniform random draw of the same size", seeded=True),
        Method(
            "coincide",
            "COINCIDE (Lee et al., 2024): clusters of a reference VLM's features shared out by their "
            "transferability over density, prototypes by MMD inside each; text-only records keep their share",
            features="coincide",
            text_only_share="proportional",
        ),
        Method(
            "semdedup",
            "SemDeDup (Abbas et al., 2023): near-duplicates of a reference VLM's last-token embeddings removed "
            "inside k-means clusters down to the budget; text-only records keep their share",
            features="semdedup",
            text_only_share="proportional",
        ),
        Method(
            "full",
            "every usable record: the reference each subset is measured against",
            every_record=True,
            evaluated_only=True,
        ),
    )
}
SELECTABLE = tuple(name for name, method in METHODS.items() if not method.evaluated_only)
FEATURE_METHODS = tuple(name for name, method in METHODS.items() if method.features)


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise XmasError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def check_selected(names: list[str]) -> None:
    """``selection.methods`` names methods one can select with."""
    unknown = [name for name in names if name not in SELECTABLE]
    if unknown:
        raise XmasError(
            f"selection.methods: {', '.join(map(repr, unknown))} is not a selection method; choose from "
            f"{', '.join(SELECTABLE)} (xmas/methods.py)"
        )


def choices_markdown() -> str:
    """The methods as docs/configuration.md lists them."""
    return "; ".join(f"`{name}`: {METHODS[name].description}" for name in SELECTABLE)
