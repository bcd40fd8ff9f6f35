"""Balanced stability sampling: exact budget, water-filling, stability order, text group, small clusters."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xmas.errors import XmasError
from xmas.io import write_parquet
from xmas.methods import METHODS
from xmas.progress import StageStats
from xmas.settings import stage_defaults
from xmas.stages.sample import budget_size, proportional_quotas, sample, water_fill, xmas_select

SETTINGS = stage_defaults("sample")  # min_cluster_size 3, text_only_share cluster (upstream's)


def select(frame, target, min_cluster_size, seed, method="xmas", **settings):
    """xmas_select for ``method`` with the sample stage's settings at their defaults but ``settings``."""
    changed = stage_defaults("sample", min_cluster_size=min_cluster_size, **settings)
    return xmas_select(frame, target, seed, METHODS[method], changed)


def valid_frame(clusters: list[int], stability: list[float] | None = None) -> pd.DataFrame:
    n = len(clusters)
    stability = stability if stability is not None else list(np.linspace(1, 2, n))
    return pd.DataFrame(
        {
            "uid": [f"u{i}" for i in range(n)],
            "index": range(n),
            "cluster": clusters,
            "stability": [np.nan if c == -1 else s for c, s in zip(clusters, stability)],
        }
    )


@pytest.mark.parametrize(
    ("budget", "n", "size"), [("0.5", 11, 6), ("0.1", 25, 3), ("1", 7, 7), ("0.25", 10, 3), (".3", 10, 3)]
)
def test_budget_size_rounds_half_up(budget, n, size):
    assert budget_size(budget, n) == size


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.1", "half"])
def test_budget_outside_zero_one_is_an_error(budget):
    with pytest.raises(XmasError, match="budget"):
        budget_size(budget, 10)


def test_water_fill_visits_smallest_groups_first():
    assert water_fill({7: 2, 8: 10, 9: 4}, 9) == {7: 2, 9: 3, 8: 4}
    assert water_fill({1: 5, 2: 5, 3: 5}, 10) == {1: 3, 2: 3, 3: 4}
    assert water_fill({1: 1, 2: 1}, 5) == {1: 1, 2: 1}


def test_water_fill_is_exact_whenever_the_groups_hold_the_target():
    rng = np.random.default_rng(0)
    for _ in range(500):
        sizes = {g: int(s) for g, s in enumerate(rng.integers(1, 40, rng.integers(1, 12)))}
        target = int(rng.integers(0, sum(sizes.values()) + 1))
        quotas = water_fill(sizes, target)
        assert sum(quotas.values()) == target
        assert all(0 <= quotas[g] <= sizes[g] for g in sizes)


def test_lowest_stability_first_with_ties_in_source_order():
    frame = valid_frame([0] * 6, [3.0, 1.0, 2.0, 1.0, 5.0, 0.5])
    chosen = select(frame, 3, 1, 0)
    assert chosen.loc[chosen.selected, "uid"].tolist() == ["u1", "u3", "u5"]
    assert chosen.loc[~chosen.selected, "reason"].unique().tolist() == ["cluster_quota_filled"]
    tie = select(valid_frame([0] * 4, [1.0, 1.0, 1.0, 1.0]), 2, 1, 0)
    assert tie.loc[tie.selected, "uid"].tolist() == ["u0", "u1"]


def test_text_only_group_is_drawn_with_the_seed():
    frame = valid_frame([-1] * 20 + [0] * 20)
    draws = [tuple(select(frame, 10, 1, seed).query("selected and cluster == -1").uid) for seed in (0, 0, 1)]
    assert len(draws[0]) == 5 and draws[0] == draws[1] and draws[0] != draws[2]
    not_drawn = select(frame, 10, 1, 0).query("not selected and cluster == -1")
    assert set(not_drawn.reason) == {"text_not_drawn"}


def test_small_clusters_are_skipped():
    frame = valid_frame([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    chosen = select(frame, 4, 3, 0)
    assert chosen.selected.sum() == 4
    assert set(chosen.query("cluster == 0").reason) == {"cluster_below_min_size"}
    assert not chosen.query("cluster == 0").selected.any()


def test_text_only_records_keep_their_share_when_proportional():
    # 168 text-only records of 1000 usable at 50%, as on the demo: upstream's rule gives them one group's quota
    frame = valid_frame([-1] * 168 + [c for c in range(8) for _ in range(104)])
    per_group = {
        share: select(frame, 500, 3, 0, text_only_share=share).query("selected").cluster.value_counts()
        for share in ("cluster", "proportional")
    }
    assert per_group["cluster"][-1] == 500 // 9 + 1 and per_group["proportional"][-1] == 84  # round(500 * 0.168)
    assert per_group["proportional"].drop(-1).tolist() == [52] * 8  # (500 - 84) / 8 clusters
    assert per_group["cluster"].sum() == per_group["proportional"].sum() == 500


def test_proportional_quotas_are_exact_and_give_back_what_images_cannot_fill():
    rng = np.random.default_rng(1)
    for _ in range(500):
        sizes = {-1: int(rng.integers(1, 50)), **{g: int(s) for g, s in enumerate(rng.integers(1, 40, 5))}}
        n_valid = sum(sizes.values())
        target = int(rng.integers(0, n_valid + 1))
        quotas = proportional_quotas(sizes, target, n_valid)
        assert sum(quotas.values()) == target and all(0 <= quotas[g] <= sizes[g] for g in sizes)
        assert quotas[-1] >= min(sizes[-1], (2 * target * sizes[-1] + n_valid) // (2 * n_valid))
    assert proportional_quotas({-1: 10, 0: 2}, 11, 12) == {0: 2, -1: 9}  # the images hold only 2


def test_xmas_proportional_is_xmas_with_the_proportional_share(small_selection):
    examples, clusters = small_selection
    manifests = [
        sample("xmas-proportional", "0.5", examples, clusters, 0, StageStats("t"), SETTINGS),
        sample(
            "xmas",
            "0.5",
            examples,
            clusters,
            0,
            StageStats("t"),
            stage_defaults("sample", text_only_share="proportional"),
        ),
        sample("xmas", "0.5", examples, clusters, 0, StageStats("t"), SETTINGS),
    ]
    pd.testing.assert_frame_equal(manifests[0], manifests[1])
    text_selected = [int(m.selected[m.uid.isin(["r10", "r11"])].sum()) for m in manifests]
    assert text_selected == [1, 1, 1]  # round(6 * 2 / 12) = 1, as one group's quota here


@pytest.fixture
def small_selection(tmp_path):
    """13 records: 10 usable image records in 3 clusters, 2 text-only, 1 excluded."""
    examples = pd.DataFrame(
        {
            "uid": [f"r{i}" for i in range(13)],
            "index": range(13),
            "has_image": [True] * 10 + [False, False, True],
            "image": [f"i{i}.png" for i in range(10)] + [None, None, "x.png"],
            "source": ["s"] * 13,
            "status": ["ok"] * 12 + ["excluded"],
            "reason": [None] * 12 + ["image_missing"],
        }
    )
    clusters = pd.DataFrame(
        {
            "uid": [f"r{i}" for i in range(12)],
            "cluster": [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, -1, -1],
            "stability": [0.3, 0.1, 0.2, 1, 2, 3, 4, 9, 8, 7, np.nan, np.nan],
        }
    )
    write_parquet(examples, tmp_path / "examples.parquet")
    write_parquet(clusters, tmp_path / "clusters.parquet")
    return tmp_path / "examples.parquet", tmp_path / "clusters.parquet"


@pytest.mark.parametrize("method", ["xmas", "xmas-proportional", "loss", "cluster-random", "random"])
def test_manifest_accounts_for_every_record_once(small_selection, method):
    examples, clusters = small_selection
    manifest = sample(method, "0.5", examples, clusters, 0, StageStats("t"), SETTINGS)
    assert manifest.uid.tolist() == [f"r{i}" for i in range(13)]
    assert manifest.selected.sum() == 6  # round(0.5 * 12 usable)
    assert manifest.loc[12, "reason"] == "excluded:image_missing" and not manifest.loc[12, "selected"]
    assert manifest.loc[~manifest.selected, "reason"].notna().all()
    assert manifest.loc[manifest.selected, "reason"].isna().all()
    again = sample(method, "0.5", examples, clusters, 0, StageStats("t"), SETTINGS)
    pd.testing.assert_frame_equal(manifest, again)


def test_xmas_subset_of_the_small_selection(small_selection):
    examples, clusters = small_selection
    manifest = sample("xmas", "0.5", examples, clusters, 0, StageStats("t"), SETTINGS)
    # groups by size: text(2), cluster 0(3), cluster 2(3), cluster 1(4); quotas 6//4=1, 5//3=1, 4//2=2, 2
    chosen = manifest.loc[manifest.selected, "uid"].tolist()
    assert chosen[:1] == ["r1"]  # cluster 0: the most stable one
    assert {"r3", "r4"} <= set(chosen)  # cluster 1: the two most stable
    assert {"r8", "r9"} <= set(chosen)  # cluster 2: the two most stable
    assert len([u for u in chosen if u in ("r10", "r11")]) == 1


def test_cluster_random_keeps_the_xmas_quotas_but_draws_inside_clusters():
    clusters = [0] * 40 + [1] * 40 + [2] * 6 + [-1] * 4
    valid = valid_frame(clusters)
    stable = select(valid, 30, 3, 0)
    drawn = [select(valid, 30, 3, seed, method="cluster-random") for seed in (0, 1)]
    per_cluster = [frame[frame.selected].cluster.value_counts().sort_index().tolist() for frame in (stable, *drawn)]
    assert per_cluster[0] == per_cluster[1] == per_cluster[2] == [4, 10, 10, 6]  # text 4, clusters 0 and 1, 2
    in_cluster_0 = [set(frame.uid[frame.selected & (frame.cluster == 0)]) for frame in (stable, *drawn)]
    assert in_cluster_0[0] == {f"u{i}" for i in range(10)}  # the most stable: lowest stability first
    assert in_cluster_0[1] != in_cluster_0[0] and in_cluster_0[1] != in_cluster_0[2]
    assert set(drawn[0].reason.dropna()) == {"cluster_quota_filled"}  # the 4 text-only records all fit


def test_full_selects_every_usable_record_and_only_with_budget_one(small_selection):
    examples, _ = small_selection
    manifest = sample("full", "1", examples, None, 0, StageStats("t"), SETTINGS)
    assert manifest.selected.tolist() == [True] * 12 + [False]
    with pytest.raises(XmasError, match="budget must be 1"):
        sample("full", "0.5", examples, None, 0, StageStats("t"), SETTINGS)


@pytest.mark.parametrize("method", ["xmas", "loss", "cluster-random"])
def test_clustered_methods_need_clusters(small_selection, method):
    examples, _ = small_selection
    with pytest.raises(XmasError, match=f"method {method} needs --clusters"):
        sample(method, "0.5", examples, None, 0, StageStats("t"), SETTINGS)


def test_xmas_needs_clusters(small_selection):
    examples, _ = small_selection
    with pytest.raises(XmasError, match="needs --clusters"):
        sample("xmas", "0.5", examples, None, 0, StageStats("t"), SETTINGS)


@pytest.mark.parametrize("tamper", ["drop", "duplicate", "unexplained", "select_excluded", "wrong_reason", "move"])
def test_accounting_fails_loudly_when_a_record_is_not_accounted_for(small_selection, tamper):
    from xmas.stages.sample import check_accounting

    examples_path, clusters = small_selection
    examples = pd.read_parquet(examples_path)
    manifest = sample("xmas", "0.5", examples_path, clusters, 0, StageStats("t"), SETTINGS)
    check_accounting(manifest, examples)  # the untouched manifest passes
    unselected = manifest.index[~manifest.selected & ~manifest.reason.str.startswith("excluded:")][0]
    if tamper == "drop":
        manifest = manifest.drop(index=0)
    elif tamper == "duplicate":
        manifest = pd.concat([manifest, manifest.iloc[[0]]])
    elif tamper == "unexplained":
        manifest.loc[unselected, "reason"] = pd.NA
    elif tamper == "select_excluded":
        manifest.loc[12, ["selected", "reason"]] = [True, pd.NA]
    elif tamper == "wrong_reason":
        manifest.loc[12, "reason"] = "excluded:image_unreadable"
    elif tamper == "move":
        manifest.loc[0, "index"] = 5
    with pytest.raises(XmasError, match="accounting failed"):
        check_accounting(manifest, examples)
