"""A simulated annotator: answers from ground truth, optionally wrong at a given rate.

It lets the loop be studied and tested without people. Every answer it gives is marked
`simulated=True`, and outputs built from it say so.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.errors import InvalidInput


@dataclass(frozen=True)
class SimulatedAnswer:
    """One label for one item; `label != true_label` only when noise struck."""

    item_id: int
    label: int
    true_label: int
    annotator: str = "simulated"
    simulated: bool = True


class SimulatedAnnotator:
    """Labels items from `truth` [n_items] (indexed by item id).

    noise: probability of answering a uniformly drawn *other* class instead of the truth.
    Answers are reproducible: the same seed and the same sequence of requests give the same
    answers.
    """

    def __init__(
        self,
        truth: NDArray[np.integer[Any]],
        *,
        n_classes: int,
        noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= noise < 1.0:
            raise InvalidInput(f"noise must be in [0, 1), got {noise}")
        if n_classes < 2:
            raise InvalidInput(f"n_classes must be >= 2, got {n_classes}")
        self.truth = np.asarray(truth, dtype=np.int64)
        if self.truth.size and (self.truth.min() < 0 or self.truth.max() >= n_classes):
            raise InvalidInput(f"truth labels must lie in [0, {n_classes})")
        self.n_classes = n_classes
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    def annotate(self, item_ids: Sequence[int] | NDArray[np.integer[Any]]) -> list[SimulatedAnswer]:
        ids = np.asarray(item_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.truth)):
            raise InvalidInput("the simulated annotator was asked about an unknown item id")
        answers = []
        for item_id in ids.tolist():
            true_label = int(self.truth[item_id])
            label = true_label
            if self.noise > 0 and self.rng.random() < self.noise:
                # Shift by 1..C-1 so the wrong answer is uniform over the other classes.
                label = (true_label + int(self.rng.integers(1, self.n_classes))) % self.n_classes
            answers.append(SimulatedAnswer(item_id=item_id, label=label, true_label=true_label))
        return answers
