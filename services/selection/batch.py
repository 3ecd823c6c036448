"""Batch-mode selection: wrappers that compose with any acquisition strategy.

    selector = ClassQuota(KCenterDiversity(TopScores(), oversample=5), rare_classes=[8],
                          min_share=0.25)
    positions = selector.select(candidates, k=20)

A selector returns positions into the candidate set, in the order they should be labeled.
Candidates already carry the strategy's scores (computed per chunk), so wrappers only decide
which of the scored items form a good batch.
"""

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from services.errors import InvalidInput
from services.selection.candidates import Candidates, top_positions


class BatchSelector(Protocol):
    """select(candidates, k) -> positions [min(k, n)] int64, unique, in labeling order."""

    def select(self, candidates: Candidates, k: int) -> NDArray[np.int64]: ...


def _check_request(candidates: Candidates, k: int) -> None:
    if len(candidates) == 0:
        raise InvalidInput("the pool is empty: there is nothing to select")
    if k < 1:
        raise InvalidInput(f"batch size must be >= 1, got {k}")


class TopScores:
    """The k highest-scored candidates."""

    def select(self, candidates: Candidates, k: int) -> NDArray[np.int64]:
        _check_request(candidates, k)
        return top_positions(candidates, k)


class KCenterDiversity:
    """k-center greedy on the embeddings of the inner selector's top k x oversample picks.

    Starts from the best-ranked pick and repeatedly adds the one farthest (Euclidean) from
    everything chosen so far, so a batch covers several confusions instead of 20 copies of one.
    Ties go to the better-ranked item. Without embeddings it falls back to the inner order.
    """

    def __init__(self, inner: BatchSelector, *, oversample: int = 5) -> None:
        if oversample < 1:
            raise InvalidInput(f"oversample must be >= 1, got {oversample}")
        self.inner = inner
        self.oversample = oversample

    def select(self, candidates: Candidates, k: int) -> NDArray[np.int64]:
        _check_request(candidates, k)
        pool = self.inner.select(candidates, k * self.oversample)
        if len(pool) <= k or candidates.embeddings.shape[1] == 0:
            return pool[:k]
        points = candidates.embeddings[pool].astype(np.float32)
        squared_norms = np.einsum("ij,ij->i", points, points)

        def squared_distances(center: int) -> NDArray[np.float32]:
            # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one matrix-vector product per pick instead of
            # an [n, D] difference array (measured 10x faster on 5,000 x 256 in bench select).
            distances: NDArray[np.float32] = (
                squared_norms - 2.0 * (points @ points[center]) + squared_norms[center]
            )
            np.maximum(distances, 0.0, out=distances)
            return distances

        chosen = [0]
        nearest = squared_distances(0)
        nearest[0] = -1.0
        for _ in range(k - 1):
            # argmax returns the first maximum: the best-ranked among equally far points.
            pick = int(np.argmax(nearest))
            chosen.append(pick)
            np.minimum(nearest, squared_distances(pick), out=nearest)
            nearest[chosen] = -1.0
        picked: NDArray[np.int64] = pool[np.asarray(chosen)]
        return picked


class ClassQuota:
    """Reserve at least `min_share` of each batch for items predicted as a rare class.

    The reserved slots are filled round-robin across `rare_classes` (best-ranked first), so no
    rare class starves the others; the inner selector fills the rest from what remains. When
    fewer rare-predicted items exist than slots, the inner selector gets the leftover slots.
    """

    def __init__(
        self, inner: BatchSelector, *, rare_classes: Sequence[int], min_share: float = 0.25
    ) -> None:
        if not 0.0 <= min_share <= 1.0:
            raise InvalidInput(f"min_share must be in [0, 1], got {min_share}")
        self.inner = inner
        self.rare_classes = sorted(set(rare_classes))
        self.min_share = min_share

    def select(self, candidates: Candidates, k: int) -> NDArray[np.int64]:
        _check_request(candidates, k)
        slots = min(math.ceil(self.min_share * min(k, len(candidates))), k)
        order = candidates.ranking()
        predicted = candidates.predicted[order]
        queues = [list(order[predicted == label]) for label in self.rare_classes]
        reserved: list[int] = []
        while len(reserved) < slots and any(queues):
            for queue in queues:
                if queue and len(reserved) < slots:
                    reserved.append(int(queue.pop(0)))
        if len(reserved) >= k:
            return np.asarray(reserved, dtype=np.int64)
        rest_mask = np.ones(len(candidates), dtype=bool)
        rest_mask[reserved] = False
        rest_positions = np.flatnonzero(rest_mask)
        if len(rest_positions) == 0:
            return np.asarray(reserved, dtype=np.int64)
        picked = self.inner.select(candidates.take(rest_positions), k - len(reserved))
        return np.concatenate([np.asarray(reserved, dtype=np.int64), rest_positions[picked]])
