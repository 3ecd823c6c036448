"""A project's selection settings and the batch they choose from scored candidates (pure)."""

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.errors import InvalidInput
from services.selection.batch import BatchSelector, ClassQuota, KCenterDiversity, TopScores
from services.selection.candidates import Candidates
from services.selection.cold_start import COLD_START_METHODS, ColdStartMethod
from services.selection.strategies import STRATEGIES

MAX_OVERSAMPLE = 100


@dataclass(frozen=True)
class SelectionConfig:
    """How a batch is chosen.

    strategy: a name from `STRATEGIES`. oversample: k-center diversity over the top
    batch x oversample candidates (None = off). quota_min_share: share of each batch reserved
    for items predicted as a rare class (None = off); a class is rare when its labeled count is
    below `rare_share` x the mean count per class. cold_start: how to pick without a model
    (`cold_start.cold_start`'s methods).
    explore_share: while the labels still miss a class, this share of each batch comes from
    cold start over the unlabeled pool, to find the missing class.
    """

    strategy: str = "least_confidence"
    oversample: int | None = 5
    quota_min_share: float | None = 0.25
    rare_share: float = 0.5
    cold_start: ColdStartMethod = "kcenter"
    explore_share: float = 0.5

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidInput(
                f"unknown strategy {self.strategy!r}; choose from {sorted(STRATEGIES)}"
            )
        if self.oversample is not None and (
            isinstance(self.oversample, bool)
            or not isinstance(self.oversample, int)
            or not 1 <= self.oversample <= MAX_OVERSAMPLE
        ):
            # Each chunk keeps batch x oversample candidates: the bound keeps that in memory.
            raise InvalidInput(
                f"oversample must be a whole number in [1, {MAX_OVERSAMPLE}] or null, "
                f"got {self.oversample!r}"
            )
        for name in ("quota_min_share", "rare_share", "explore_share"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise InvalidInput(f"{name} must be in [0, 1], got {value}")
        if self.cold_start not in COLD_START_METHODS:
            raise InvalidInput(
                f"cold_start must be one of {list(COLD_START_METHODS)}, got {self.cold_start!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SelectionConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInput(f"unknown selection settings: {sorted(unknown)}")
        try:
            return cls(**data)
        except InvalidInput:
            raise
        except (TypeError, ValueError) as error:  # a value of the wrong type
            raise InvalidInput(f"invalid selection settings: {error}") from None

    def candidate_multiplier(self) -> int:
        """k' / batch: how many candidates per batch slot scoring chunks must keep."""
        return self.oversample or 1

    def selector(self, rare: Sequence[int]) -> BatchSelector:
        selector: BatchSelector = TopScores()
        if self.oversample is not None:
            selector = KCenterDiversity(selector, oversample=self.oversample)
        if self.quota_min_share is not None and rare:
            selector = ClassQuota(selector, rare_classes=rare, min_share=self.quota_min_share)
        return selector


def rare_classes(counts: NDArray[np.integer[Any]], rare_share: float) -> list[int]:
    """Classes whose labeled count is below rare_share x the mean count per class."""
    threshold = rare_share * counts.sum() / len(counts)
    return [int(c) for c in np.flatnonzero(counts < threshold)]


def select_from(
    candidates: Candidates,
    *,
    counts: NDArray[np.integer[Any]],
    config: SelectionConfig,
    batch_size: int,
) -> NDArray[np.int64]:
    """The batch's item ids, in labeling order. counts: labels per class [C]."""
    selector = config.selector(rare_classes(counts, config.rare_share))
    return candidates.item_ids[selector.select(candidates, batch_size)]
