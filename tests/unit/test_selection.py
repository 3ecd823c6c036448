"""One contract for every acquisition strategy and batch wrapper, plus exact merge checks."""

from collections.abc import Callable

import numpy as np
import pytest

from services.errors import InvalidInput
from services.selection.batch import BatchSelector, ClassQuota, KCenterDiversity, TopScores
from services.selection.candidates import (
    Candidates,
    chunk_candidates,
    merge_candidates,
    top_positions,
)
from services.selection.cold_start import cold_start
from services.selection.strategies import STRATEGIES, Entropy, ExpectedFocalLoss, make_strategy

# Rows from easiest to hardest: every uncertainty strategy must rank them in reverse.
EASY_TO_HARD = np.array(
    [
        [0.98, 0.01, 0.01],
        [0.80, 0.15, 0.05],
        [0.60, 0.30, 0.10],
        [0.34, 0.33, 0.33],
    ]
)
UNCERTAINTY = [name for name in STRATEGIES if name != "random"]


@pytest.mark.parametrize("name", UNCERTAINTY)
def test_uncertainty_strategies_rank_hard_items_first(name: str) -> None:
    scores = make_strategy(name).scores(EASY_TO_HARD)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert np.argsort(-scores).tolist() == [3, 2, 1, 0]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_is_deterministic_under_a_seed(name: str) -> None:
    probs = np.random.default_rng(0).dirichlet(np.ones(5), size=50)
    first = make_strategy(name, seed=3).scores(probs)
    second = make_strategy(name, seed=3).scores(probs)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_refuses_an_empty_pool_and_bad_rows(name: str) -> None:
    with pytest.raises(InvalidInput, match="pool is empty"):
        make_strategy(name).scores(np.empty((0, 3)))
    with pytest.raises(InvalidInput, match="sum to 1"):
        make_strategy(name).scores(np.array([[0.5, 0.6]]))


def test_strategy_values_are_exact() -> None:
    row = np.array([[0.6, 0.3, 0.1]])
    assert make_strategy("least_confidence").scores(row)[0] == pytest.approx(0.4)
    assert make_strategy("margin").scores(row)[0] == pytest.approx(0.7)
    entropy = -(0.6 * np.log(0.6) + 0.3 * np.log(0.3) + 0.1 * np.log(0.1))
    assert Entropy().scores(row)[0] == pytest.approx(entropy)
    assert ExpectedFocalLoss(gamma=0.0).scores(row)[0] == pytest.approx(entropy)
    focal = sum(p * (1 - p) ** 2 * -np.log(p) for p in (0.6, 0.3, 0.1))
    assert ExpectedFocalLoss(gamma=2.0).scores(row)[0] == pytest.approx(focal)


def test_random_depends_on_its_seed_only() -> None:
    probs = np.full((100, 2), 0.5)
    assert not np.array_equal(
        make_strategy("random", seed=1).scores(probs), make_strategy("random", seed=2).scores(probs)
    )


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown strategy 'coreset'"):
        make_strategy("coreset")


def _candidates(n: int = 60, seed: int = 0) -> Candidates:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(4) * 0.5, size=n)
    scores = make_strategy("least_confidence").scores(probs)
    return Candidates.build(np.arange(100, 100 + n), probs, scores, rng.normal(size=(n, 8)))


SELECTORS: dict[str, Callable[[], BatchSelector]] = {
    "top": TopScores,
    "diversity": lambda: KCenterDiversity(TopScores(), oversample=3),
    "quota": lambda: ClassQuota(TopScores(), rare_classes=[3], min_share=0.3),
    "quota+diversity": lambda: ClassQuota(
        KCenterDiversity(TopScores(), oversample=5), rare_classes=[2, 3], min_share=0.25
    ),
}


@pytest.mark.parametrize("name", list(SELECTORS))
def test_selector_contract(name: str) -> None:
    candidates = _candidates()
    picked = SELECTORS[name]().select(candidates, 10)
    assert picked.dtype == np.int64 and len(picked) == 10
    assert len(set(picked.tolist())) == 10
    np.testing.assert_array_equal(picked, SELECTORS[name]().select(candidates, 10))
    everything = SELECTORS[name]().select(candidates, 500)  # k larger than the pool
    assert sorted(everything.tolist()) == list(range(60))
    with pytest.raises(InvalidInput, match="pool is empty"):
        SELECTORS[name]().select(candidates.take(np.empty(0, dtype=np.int64)), 5)
    with pytest.raises(InvalidInput, match="batch size must be >= 1"):
        SELECTORS[name]().select(candidates, 0)


@pytest.mark.parametrize("name", list(SELECTORS))
def test_selector_known_ranking_on_uniform_embeddings(name: str) -> None:
    """With one class predicted everywhere and identical embeddings, every wrapper reduces to
    the plain top-k by score."""
    probs = np.tile([[0.7, 0.1, 0.1, 0.1]], (20, 1))
    scores = np.linspace(0, 1, 20)[::-1].copy()
    candidates = Candidates.build(np.arange(20), probs, scores, np.zeros((20, 4)))
    assert sorted(SELECTORS[name]().select(candidates, 5).tolist()) == [0, 1, 2, 3, 4]


def test_ties_are_broken_by_item_id() -> None:
    candidates = Candidates.build(
        np.array([9, 3, 7, 1]), np.full((4, 2), 0.5), np.array([0.5, 0.5, 0.9, 0.5])
    )
    assert candidates.item_ids[TopScores().select(candidates, 4)].tolist() == [7, 1, 3, 9]


def test_diversity_spreads_a_batch_over_clusters() -> None:
    # The 5 best-scored items sit on one point; 5 slightly worse ones on another.
    embeddings = np.vstack([np.zeros((5, 2)), np.full((5, 2), 10.0)])
    scores = np.array([1.0, 0.99, 0.98, 0.97, 0.96, 0.9, 0.89, 0.88, 0.87, 0.86])
    candidates = Candidates.build(np.arange(10), np.full((10, 2), 0.5), scores, embeddings)
    assert TopScores().select(candidates, 2).tolist() == [0, 1]
    assert KCenterDiversity(TopScores(), oversample=5).select(candidates, 2).tolist() == [0, 5]


def test_class_quota_reserves_slots_for_rare_predictions() -> None:
    probs = np.array([[0.9, 0.1]] * 8 + [[0.2, 0.8]] * 2)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    candidates = Candidates.build(np.arange(10), probs, scores)
    picked = ClassQuota(TopScores(), rare_classes=[1], min_share=0.5).select(candidates, 4)
    assert picked.tolist() == [8, 9, 0, 1]
    with pytest.raises(InvalidInput, match="min_share"):
        ClassQuota(TopScores(), rare_classes=[1], min_share=1.5)


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 333, 5000])
def test_merged_chunk_candidates_equal_the_global_top_k(chunk_size: int) -> None:
    rng = np.random.default_rng(4)
    n, k_prime = 2000, 25
    probs = rng.dirichlet(np.ones(5) * 0.3, size=n)
    # Coarse scores force many ties, so the id tie-break is exercised.
    scores = np.round(make_strategy("margin").scores(probs), 2)
    ids = rng.permutation(10 * n)[:n]
    pool = Candidates.build(ids, probs, scores, rng.normal(size=(n, 3)))
    chunks = [
        chunk_candidates(pool.take(np.arange(start, min(start + chunk_size, n))), k_prime)
        for start in range(0, n, chunk_size)
    ]
    merged = merge_candidates(chunks)
    global_top = pool.item_ids[top_positions(pool, k_prime)]
    np.testing.assert_array_equal(merged.item_ids[top_positions(merged, k_prime)], global_top)
    for label in range(5):
        in_pool = np.flatnonzero(pool.predicted[pool.ranking()] == label)
        expected = pool.item_ids[pool.ranking()[in_pool][:k_prime]]
        in_merged = np.flatnonzero(merged.predicted[merged.ranking()] == label)
        actual = merged.item_ids[merged.ranking()[in_merged][:k_prime]]
        np.testing.assert_array_equal(actual, expected)
    assert len(merged) <= len(chunks) * k_prime * 6


@pytest.mark.parametrize("chunk_size", [7, 333])
def test_merging_with_k_prime_keeps_exactly_the_top_k_overall_and_per_class(
    chunk_size: int,
) -> None:
    rng = np.random.default_rng(5)
    n, k_prime = 1500, 20
    probs = rng.dirichlet(np.ones(4) * 0.4, size=n)
    scores = np.round(make_strategy("entropy").scores(probs), 2)
    pool = Candidates.build(rng.permutation(n) * 3, probs, scores, rng.normal(size=(n, 6)))
    chunks = [
        chunk_candidates(pool.take(np.arange(start, min(start + chunk_size, n))), k_prime)
        for start in range(0, n, chunk_size)
    ]
    full = merge_candidates(chunks)
    expected = chunk_candidates(full, k_prime)  # the same cut applied to the full merge
    reduced = merge_candidates(chunks, k_prime=k_prime)
    np.testing.assert_array_equal(reduced.item_ids, expected.item_ids)
    np.testing.assert_array_equal(reduced.embeddings, expected.embeddings)
    np.testing.assert_array_equal(reduced.probs, expected.probs)
    assert len(reduced) < len(full)
    selector = ClassQuota(KCenterDiversity(TopScores(), oversample=3), rare_classes=[3])
    np.testing.assert_array_equal(
        full.item_ids[selector.select(full, k_prime)],
        reduced.item_ids[selector.select(reduced, k_prime)],
    )


def test_k_center_picks_match_the_direct_distance_computation() -> None:
    rng = np.random.default_rng(6)
    n, k = 400, 40
    pool = Candidates.build(
        np.arange(n), rng.dirichlet(np.ones(3), size=n), rng.random(n), rng.normal(size=(n, 16))
    )
    picked = KCenterDiversity(TopScores(), oversample=5).select(pool, k)
    # Reference: the textbook greedy with explicit differences.
    order = pool.ranking()[: k * 5]
    points = pool.embeddings[order].astype(np.float64)
    chosen = [0]
    nearest = ((points - points[0]) ** 2).sum(axis=1)
    nearest[0] = -1
    for _ in range(k - 1):
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, ((points - points[pick]) ** 2).sum(axis=1))
        nearest[chosen] = -1
    np.testing.assert_array_equal(picked, order[chosen])


def test_candidates_refuse_duplicate_ids_and_bad_shapes() -> None:
    with pytest.raises(InvalidInput, match="unique"):
        Candidates.build(np.array([1, 1]), np.full((2, 2), 0.5), np.zeros(2))
    with pytest.raises(InvalidInput, match="probs must be"):
        Candidates.build(np.array([1, 2]), np.full((3, 2), 0.5), np.zeros(2))


@pytest.mark.parametrize("method", ["random", "kmeans", "kcenter"])
def test_cold_start_picks_unique_items_deterministically(method: str) -> None:
    features = np.random.default_rng(0).normal(size=(200, 5))
    first = cold_start(features, 12, method=method, seed=1)  # type: ignore[arg-type]
    assert len(set(first.tolist())) == 12
    np.testing.assert_array_equal(first, cold_start(features, 12, method=method, seed=1))  # type: ignore[arg-type]
    assert len(cold_start(features[:5], 12, method=method, seed=1)) == 5  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="pool is empty"):
        cold_start(features[:0], 3, method=method, seed=1)  # type: ignore[arg-type]


def test_kcenter_goes_farthest_from_the_labeled_items_first() -> None:
    # Squared distances to the labeled 0: 0, 1, 4, 100, 121. 11 first; then 2 (4 from 0, 81
    # from 11); then 1 and 10 tie at 1, the lower position wins.
    points = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    assert cold_start(points, 3, method="kcenter", seed=0, labeled=np.array([[0.0]])).tolist() == [
        4,
        2,
        1,
    ]


def test_kcenter_finds_the_class_the_labels_miss() -> None:
    # The labels cover the common cloud only; 1% of the pool lies elsewhere. One batch of
    # farthest-first picks reaches it, where k-means members reach it at about its rate.
    rng = np.random.default_rng(0)
    common = rng.normal(0, 1, size=(1980, 10))
    rare = rng.normal(0, 1, size=(20, 10))
    rare[:, :3] += 4.0
    features = np.vstack([common, rare])
    labeled = common[rng.choice(1980, 20, replace=False)]
    picked = cold_start(features, 10, method="kcenter", seed=0, labeled=labeled)
    assert np.sum(picked >= 1980) >= 3
    kmeans = cold_start(features, 10, method="kmeans", seed=0)
    assert np.sum(kmeans >= 1980) < np.sum(picked >= 1980)


def test_kmeans_cold_start_finds_a_separate_small_cluster() -> None:
    rng = np.random.default_rng(0)
    features = np.vstack([rng.normal(0, 1, size=(295, 2)), rng.normal(40, 1, size=(5, 2))])
    picked = cold_start(features, 4, method="kmeans", seed=0)
    assert np.any(picked >= 295)


def test_kmeans_cold_start_reaches_an_atypical_rare_kind_near_its_rate() -> None:
    # 2% of the items are shifted along one axis: atypical, but inside the common cloud, so
    # they form no cluster of their own. The items nearest the centroids (the method before)
    # picked none of them in 400 picks; random members of the clusters pick them at about the
    # rate a uniform sample would (8 expected).
    rng = np.random.default_rng(0)
    common = rng.normal(0, 1, size=(1960, 10))
    rare = rng.normal(0, 1, size=(40, 10))
    rare[:, 0] += 2.0
    features = np.vstack([common, rare])
    found = sum(
        int(np.sum(cold_start(features, 10, method="kmeans", seed=seed) >= 1960))
        for seed in range(40)
    )
    assert found >= 4, found
