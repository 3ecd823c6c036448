"""Cold start: picking items before a model exists (or while the labels miss a class)."""

from typing import Any, Literal, get_args

import numpy as np
from numpy.typing import NDArray
from sklearn.cluster import KMeans

from services.errors import InvalidInput

ColdStartMethod = Literal["random", "kmeans", "kcenter"]
COLD_START_METHODS: tuple[str, ...] = get_args(ColdStartMethod)


def cold_start(
    features: NDArray[np.floating[Any]],
    k: int,
    *,
    method: ColdStartMethod,
    seed: int,
    labeled: NDArray[np.floating[Any]] | None = None,
) -> NDArray[np.int64]:
    """Positions of k items to label first, chosen without a model.

    features: [n, d] (images are flattened); labeled: the labeled items' features [m, d] (only
    "kcenter" reads them). "random": a seeded uniform sample. "kmeans": one item per k-means
    cluster (k clusters), a seeded random member of it, so the picks cover the feature space
    instead of its densest region and, within a cluster, reach a rare class at its rate there.
    "kcenter": farthest-first from the labeled items (k-center greedy): a class the labels miss
    lies, most likely, where no labeled item is; as "kmeans" while nothing is labeled, since the
    farthest items of an unlabeled pool are its outliers.
    Returns min(k, n) unique positions.
    """
    if len(features) == 0:
        raise InvalidInput("the pool is empty: there is nothing to select")
    points = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    if k < 1:
        raise InvalidInput(f"batch size must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    if k >= len(points):
        return np.arange(len(points), dtype=np.int64)
    if method not in COLD_START_METHODS:
        raise InvalidInput(
            f"unknown cold-start method {method!r}; choose one of {list(COLD_START_METHODS)}"
        )
    if method == "random":
        return np.sort(rng.choice(len(points), size=k, replace=False)).astype(np.int64)
    if method == "kcenter" and labeled is not None and len(labeled):
        known = np.asarray(labeled, dtype=np.float32).reshape(len(labeled), -1)
        return farthest_first(points, known, k)
    return _kmeans_members(points, k, rng, seed)


def farthest_first(
    points: NDArray[np.float32], labeled: NDArray[np.float32], k: int
) -> NDArray[np.int64]:
    """k positions of `points` [n, d], each the farthest (Euclidean) from the labeled items
    [m >= 1, d] and from the picks before it. Memory: [n, 512] distances at a time."""
    squared = np.einsum("ij,ij->i", points, points)
    nearest = np.full(len(points), np.inf, dtype=np.float32)
    for start in range(0, len(labeled), 512):
        block = labeled[start : start + 512]
        distances = squared[:, None] - 2 * points @ block.T + np.einsum("ij,ij->i", block, block)
        nearest = np.minimum(nearest, distances.min(axis=1))
    picked: list[int] = []
    for _ in range(k):
        choice = int(np.argmax(nearest))  # ties: the lowest position
        picked.append(choice)
        nearest = np.minimum(nearest, ((points - points[choice]) ** 2).sum(axis=1))
        nearest[picked] = -np.inf
    return np.asarray(picked, dtype=np.int64)


def _kmeans_members(
    points: NDArray[np.float32], k: int, rng: np.random.Generator, seed: int
) -> NDArray[np.int64]:
    clusters = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(points)
    # Not the item nearest each centroid: that is the cluster's most typical item, never a rare
    # class's, so a class missing from the labels stayed missing (a binary set with 2% positives
    # went 300 labels without a model; bench peers, BENCHMARKS.md).
    picked = [
        int(rng.choice(members))
        for cluster in range(k)
        if len(members := np.flatnonzero(clusters == cluster))
    ]
    if len(picked) < k:  # fewer clusters than asked (repeated points): fill at random
        rest = np.setdiff1d(np.arange(len(points)), picked)
        picked += rng.choice(rest, size=k - len(picked), replace=False).tolist()
    return np.asarray(picked, dtype=np.int64)
