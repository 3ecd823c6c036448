"""Cold start: picking items before a model exists (or while the labels miss a class)."""

from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from sklearn.cluster import KMeans

from services.errors import InvalidInput

ColdStartMethod = Literal["random", "kmeans"]


def cold_start(
    features: NDArray[np.floating[Any]], k: int, *, method: ColdStartMethod, seed: int
) -> NDArray[np.int64]:
    """Positions of k items to label first, chosen without a model.

    features: [n, d] (images are flattened). "random": a seeded uniform sample. "kmeans": one
    item per k-means cluster (k clusters), a seeded random member of it, so the picks cover
    the feature space instead of its densest region (a rare class that forms its own cluster is
    found early) and, within a cluster, reach a rare class at its rate there.
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
    if method == "random":
        return np.sort(rng.choice(len(points), size=k, replace=False)).astype(np.int64)
    if method != "kmeans":
        raise InvalidInput(f"unknown cold-start method {method!r}; choose random or kmeans")
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
