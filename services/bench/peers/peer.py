"""The peers: scikit-activeml's pool-based query strategies with plain scikit-learn models, run
on exactly the split, initial labels and annotator answers the product's run of the same seed
gets. A benchmark dependency only (the `dev` extra); the product never imports it.

Registry: arm name -> (query strategy, classifier). Each arm labels `batch` items per round,
refits on every label it holds, and records the rare classes' F1 on the test split after every
round, from the initial labels to the budget.
"""

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.base import ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.neural_network import MLPClassifier

from labeling.simulated import simulated_answer
from services.simulation.data import Split

ModelFactory = Callable[[int], ClassifierMixin]


def _mlp(seed: int) -> ClassifierMixin:
    # The configuration the issue measured: scikit-learn's defaults, one hidden layer of 128.
    return MLPClassifier(hidden_layer_sizes=(128,), random_state=seed)


def _logistic(seed: int) -> ClassifierMixin:
    return LogisticRegression(max_iter=1000, random_state=seed)


@dataclass(frozen=True)
class PeerArm:
    """query: "least_confident" (scikit-activeml's UncertaintySampling) or "random"."""

    query: str
    model: ModelFactory


PEER_ARMS: dict[str, PeerArm] = {
    "skactiveml-us/mlp": PeerArm("least_confident", _mlp),
    "skactiveml-us/logreg": PeerArm("least_confident", _logistic),
    "skactiveml-random/mlp": PeerArm("random", _mlp),
}


def annotator_answers(split: Split, n_classes: int, *, noise: float, seed: int) -> NDArray[Any]:
    """What the product's simulated annotator answers for each pool item [n]: the same function,
    seed and item keys ("i000000" + position), so both sides get identical labels."""
    names = [str(c) for c in range(n_classes)]
    return np.array(
        [
            int(simulated_answer(names[int(y)], names, noise=noise, seed=seed, key=f"i{i:06d}"))
            for i, y in enumerate(split.pool_labels)
        ],
        dtype=np.float64,
    )


def rare_f1(truth: NDArray[np.int64], predicted: NDArray[Any], rare: tuple[int, ...]) -> float:
    """Mean F1 of the rare classes (0 where a class is never predicted nor present)."""
    scores = f1_score(truth, predicted, labels=list(rare), average=None, zero_division=0)
    return float(np.mean(scores))


def run_peer(
    arm: PeerArm,
    split: Split,
    *,
    n_classes: int,
    rare: tuple[int, ...],
    noise: float,
    seed: int,
    batch: int,
    budget: int,
) -> tuple[list[int], list[float]]:
    """(labels after each round, rare-class F1 on the test split then): the initial labels are
    the seed's (always right), every later label is the simulated annotator's answer."""
    from skactiveml.classifier import SklearnClassifier
    from skactiveml.pool import RandomSampling, UncertaintySampling
    from skactiveml.utils import MISSING_LABEL

    features = split.pool_items.reshape(len(split.pool_items), -1).astype(np.float64)
    test = split.test_items.reshape(len(split.test_items), -1).astype(np.float64)
    answers = annotator_answers(split, n_classes, noise=noise, seed=seed)
    known = np.full(len(features), MISSING_LABEL, dtype=np.float64)
    known[split.init_ids] = split.pool_labels[split.init_ids]
    classifier = SklearnClassifier(arm.model(seed), classes=np.arange(n_classes), random_state=seed)
    strategy: Any = (
        UncertaintySampling(method="least_confident", random_state=seed)
        if arm.query == "least_confident"
        else RandomSampling(random_state=seed)
    )
    labels_axis: list[int] = []
    scores: list[float] = []
    with warnings.catch_warnings():
        # Small label sets stop MLP/LR fits before convergence; that is the peer as users run it.
        warnings.simplefilter("ignore", ConvergenceWarning)
        while True:
            classifier.fit(features, known)
            labeled = int(np.count_nonzero(~np.isnan(known)))
            labels_axis.append(labeled)
            scores.append(rare_f1(split.test_labels, classifier.predict(test), rare))
            if labeled + batch > budget or labeled + batch > len(features):
                break
            if arm.query == "random":
                chosen = strategy.query(X=features, y=known, batch_size=batch)
            else:
                chosen = strategy.query(
                    X=features, y=known, clf=classifier, fit_clf=False, batch_size=batch
                )
            known[chosen] = answers[chosen]
    return labels_axis, scores
