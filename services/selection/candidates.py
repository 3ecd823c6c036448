"""Candidate sets: what each scored chunk of the pool hands to selection, and their merge.

Large pools are scored in chunks. A chunk keeps only its candidates: its top-k' items by score
and its top-k' items per predicted class (k' = batch x oversample), each with its probability
vector and embedding. Merging the chunks' candidates yields exactly the global top-k' overall and
per predicted class (tested). Diversity and class quotas then work on the merged candidates,
which is an approximation: an item outside every top-k' list can never be picked, even if
k-center greedy would have preferred it for coverage.

Order everywhere: score descending, ties broken by item id ascending.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.errors import InvalidInput


@dataclass(frozen=True)
class Candidates:
    """Scored items. item_ids [n] int64 (unique), probs [n, C] float32, embeddings [n, D]
    float32 (D may be 0 when no embeddings exist), scores [n] float32 (higher = label first)."""

    item_ids: NDArray[np.int64]
    probs: NDArray[np.float32]
    embeddings: NDArray[np.float32]
    scores: NDArray[np.float32]

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        if self.item_ids.ndim != 1 or self.scores.shape != (n,):
            raise InvalidInput("item_ids and scores must be 1-d and of equal length")
        if self.probs.ndim != 2 or self.probs.shape[0] != n:
            raise InvalidInput(f"probs must be [{n}, C], got {self.probs.shape}")
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != n:
            raise InvalidInput(f"embeddings must be [{n}, D], got {self.embeddings.shape}")
        if len(np.unique(self.item_ids)) != n:
            raise InvalidInput("item ids must be unique within a candidate set")

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def predicted(self) -> NDArray[np.int64]:
        """Predicted class per item, [n]."""
        return np.asarray(self.probs.argmax(axis=1), dtype=np.int64)

    @classmethod
    def build(
        cls,
        item_ids: NDArray[np.integer[Any]],
        probs: NDArray[np.floating[Any]],
        scores: NDArray[np.floating[Any]],
        embeddings: NDArray[np.floating[Any]] | None = None,
    ) -> "Candidates":
        ids = np.asarray(item_ids, dtype=np.int64)
        emb = (
            np.zeros((len(ids), 0), dtype=np.float32)
            if embeddings is None
            else np.asarray(embeddings, dtype=np.float32)
        )
        return cls(
            ids, np.asarray(probs, dtype=np.float32), emb, np.asarray(scores, dtype=np.float32)
        )

    def take(self, positions: NDArray[np.integer[Any]]) -> "Candidates":
        return Candidates(
            self.item_ids[positions],
            self.probs[positions],
            self.embeddings[positions],
            self.scores[positions],
        )

    def ranking(self) -> NDArray[np.int64]:
        """Positions ordered by score descending, then item id ascending."""
        order: NDArray[np.int64] = np.lexsort(
            (self.item_ids, -self.scores.astype(np.float64))
        ).astype(np.int64)
        return order


def top_positions(candidates: Candidates, k: int) -> NDArray[np.int64]:
    """Positions of the k best-ranked candidates (all of them when k >= n)."""
    return candidates.ranking()[:k]


def chunk_candidates(chunk: Candidates, k_prime: int) -> Candidates:
    """A chunk's candidates: its top-k' overall plus its top-k' per predicted class, ranked."""
    if k_prime < 1:
        raise InvalidInput(f"k' must be >= 1, got {k_prime}")
    order = chunk.ranking()
    keep = np.zeros(len(chunk), dtype=bool)
    keep[order[:k_prime]] = True
    predicted = chunk.predicted[order]
    for label in np.unique(predicted):
        keep[order[predicted == label][:k_prime]] = True
    return chunk.take(order[keep[order]])


def merge_candidates(chunks: list[Candidates], k_prime: int | None = None) -> Candidates:
    """One ranked candidate set from every chunk's candidates (item ids must not repeat).

    With `k_prime`, only the merged set's top-k' overall and per predicted class are kept: the
    same rule `chunk_candidates` applies, so every selector sees exactly what it would have
    seen in the full merge. Ranking and the cut use ids, scores and probabilities only; the
    embeddings (the bulk: [n, D] float32) are gathered for the kept rows alone.
    """
    if not chunks:
        raise InvalidInput("no chunk candidates to merge")
    item_ids = np.concatenate([c.item_ids for c in chunks])
    scores = np.concatenate([c.scores for c in chunks])
    probs = np.concatenate([c.probs for c in chunks])
    order = np.lexsort((item_ids, -scores.astype(np.float64))).astype(np.int64)
    if k_prime is not None:
        if k_prime < 1:
            raise InvalidInput(f"k' must be >= 1, got {k_prime}")
        keep = np.zeros(len(order), dtype=bool)
        keep[order[:k_prime]] = True
        predicted = probs.argmax(axis=1)[order]
        for label in np.unique(predicted):
            keep[order[predicted == label][:k_prime]] = True
        order = order[keep[order]]
    offsets = np.cumsum([0] + [len(c) for c in chunks])
    owner = np.searchsorted(offsets, order, side="right") - 1
    width = chunks[0].embeddings.shape[1]
    embeddings = np.empty((len(order), width), dtype=np.float32)
    for index in np.unique(owner):
        rows = np.flatnonzero(owner == index)
        embeddings[rows] = chunks[index].embeddings[order[rows] - offsets[index]]
    return Candidates(item_ids[order], probs[order], embeddings, scores[order])
