"""Acquisition strategies: per-item informativeness scores from class probabilities.

Every strategy maps probs [n, C] (rows sum to 1) to scores [n] float32 where higher means
"label this first". They are chosen by name through `STRATEGIES`; batch-level behaviour
(diversity, class quotas) lives in wrappers (`services.selection.batch`), never in branches here.
"""

import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from services.errors import InvalidInput

Probs = NDArray[np.floating[Any]]
Scores = NDArray[np.float32]


@runtime_checkable
class AcquisitionStrategy(Protocol):
    """scores(probs [n, C]) -> [n] float32, higher = label first; deterministic given its seed."""

    def scores(self, probs: Probs) -> Scores: ...


def check_probs(probs: Probs) -> NDArray[np.float64]:
    """probs as float64 [n, C]; refuses empty pools and rows that are not distributions."""
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 2:
        raise InvalidInput(f"probs must be [n, C >= 2], got shape {array.shape}")
    if array.shape[0] == 0:
        raise InvalidInput("the pool is empty: there is nothing to score")
    if not np.all(np.isfinite(array)) or not np.allclose(array.sum(axis=1), 1.0, atol=1e-3):
        raise InvalidInput("every row of probs must be finite and sum to 1")
    return array


def _as_scores(values: NDArray[Any]) -> Scores:
    return np.asarray(values, dtype=np.float32)


class LeastConfidence:
    """1 - max_c p_c: the model's doubt about its own top answer (low p_t for unlabeled items)."""

    def scores(self, probs: Probs) -> Scores:
        return _as_scores(1.0 - check_probs(probs).max(axis=1))


class Margin:
    """1 - (p_top1 - p_top2): items whose two best classes are nearly tied come first."""

    def scores(self, probs: Probs) -> Scores:
        top2 = np.sort(check_probs(probs), axis=1)[:, -2:]
        return _as_scores(1.0 - (top2[:, 1] - top2[:, 0]))


class Entropy:
    """Shannon entropy of the predictive distribution, in nats."""

    def scores(self, probs: Probs) -> Scores:
        p = check_probs(probs)
        return _as_scores(-np.sum(p * np.log(np.clip(p, 1e-300, 1.0)), axis=1))


class ExpectedFocalLoss:
    """Expected focal loss under the model's own distribution: sum_y p_y (1 - p_y)^g (-log p_y).

    With gamma = 0 this is the entropy; larger gamma discounts classes the model is sure of.
    """

    def __init__(self, gamma: float = 2.0) -> None:
        if not gamma >= 0:
            raise InvalidInput(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def scores(self, probs: Probs) -> Scores:
        p = check_probs(probs)
        focal = p * (1.0 - p) ** self.gamma * -np.log(np.clip(p, 1e-300, 1.0))
        return _as_scores(focal.sum(axis=1))


class Random:
    """Uniform random scores from a seeded generator: the baseline every arm is compared to.

    Each call draws fresh scores from the generator, so a fixed seed and a fixed call sequence
    reproduce the same picks.
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def scores(self, probs: Probs) -> Scores:
        n_items = check_probs(probs).shape[0]
        return _as_scores(np.asarray(self.rng.random(n_items, dtype=np.float32)))


STRATEGIES: dict[str, Callable[..., AcquisitionStrategy]] = {
    "least_confidence": LeastConfidence,
    "margin": Margin,
    "entropy": Entropy,
    "expected_focal": ExpectedFocalLoss,
    "random": Random,
}


def make_strategy(name: str, *, seed: int = 0, gamma: float = 2.0) -> AcquisitionStrategy:
    """The strategy registered under `name`, given whichever of `seed`/`gamma` it takes."""
    try:
        factory = STRATEGIES[name]
    except KeyError:
        raise InvalidInput(
            f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}"
        ) from None
    offered = {"seed": seed, "gamma": gamma}
    accepted = inspect.signature(factory).parameters
    return factory(**{key: value for key, value in offered.items() if key in accepted})
