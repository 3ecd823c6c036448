"""One trial: a (gamma, alpha) setting trained with the project's own recipe on every training
fold and judged on the fold it did not see.

Every setting trains fold k with the same seed (common random numbers): two settings differ on a
fold by their loss alone, so their difference is not drowned by initialization noise.
"""

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from services.cycle.seeds import Purpose, derive_seed
from services.ml.nets import spec_for_inputs
from services.ml.score import score
from services.recipe import Recipe, fit
from services.tuning.folds import Fold, FoldScores, fold_scores
from services.tuning.space import Setting, to_loss

# Called after each fold with (folds done, the metric's mean so far); True stops the trial
# (a pruner's verdict; ignored after the last fold).
AfterFold = Callable[[int, float], bool]


@dataclass(frozen=True)
class TuningData:
    """A project's labeled training rows: items [m, *item_shape] float32, labels [m] class
    indices; class_names [C]; rare_class: the class with the fewest labels (ties: the first).
    rows_sha: a digest of the rows (item ids and labels), which every trial of a study must
    see unchanged."""

    items: NDArray[np.float32]
    labels: NDArray[np.int64]
    class_names: list[str]
    seed: int
    version: int
    rows_sha: str = ""

    @property
    def rare_class(self) -> int:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return int(np.argmin(counts))


@dataclass(frozen=True)
class Metric:
    """What a study maximizes, from one fold's scores: "macro_f1", or the "f1" or "recall" of
    the class `class_index` (the minority F1 is "f1" of the class with the fewest labels)."""

    name: str
    class_index: int | None = None

    def of(self, scores: FoldScores) -> float:
        if self.name == "macro_f1":
            return scores.macro_f1
        assert self.class_index is not None
        values = scores.recall if self.name == "recall" else scores.f1
        return values[self.class_index]


@dataclass
class TrialOutcome:
    """A setting's per-fold scores, in fold order; pruned when stopped before the last fold."""

    setting: Setting
    folds: list[FoldScores] = field(default_factory=list)
    pruned: bool = False

    def mean(self, metric: Metric) -> float:
        return statistics.fmean(metric.of(scores) for scores in self.folds)

    def per_class_mean(self, name: str) -> list[float]:
        """Mean over folds of the per-class "precision", "recall" or "f1" [C]."""
        rows = [getattr(scores, name) for scores in self.folds]
        return [float(v) for v in np.mean(np.array(rows), axis=0)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "gamma": self.setting.gamma,
            "alpha": self.setting.alpha,
            "pruned": self.pruned,
            "folds": [vars(scores) for scores in self.folds],
        }


def run_trial(
    setting: Setting,
    data: TuningData,
    folds: list[Fold],
    recipe: Recipe,
    metric: Metric,
    after_fold: AfterFold | None = None,
) -> TrialOutcome:
    """Train and judge `setting` on each fold in turn (from scratch, the recipe's schedule)."""
    loss = to_loss(setting, recipe.loss, rare_class=data.rare_class)
    trial_recipe = replace(recipe, loss=loss)
    n_classes = len(data.class_names)
    outcome = TrialOutcome(setting)
    for index, fold in enumerate(folds):
        spec = spec_for_inputs(data.items.shape[1:], n_classes, labeled=len(fold.train))
        seed = derive_seed(data.seed, data.version, Purpose.TUNE, 1, index)
        result = fit(
            items=data.items[fold.train],
            labels=data.labels[fold.train],
            spec=spec,
            recipe=trial_recipe,
            seed=seed,
        )
        probs = score(
            result.model,
            data.items[fold.held],
            spec=spec,
            temperature=result.temperature,
            device=recipe.train.device,
        ).probs
        predicted = probs.argmax(1).astype(np.int64)
        outcome.folds.append(fold_scores(data.labels[fold.held], predicted, n_classes))
        stop = after_fold is not None and after_fold(index + 1, outcome.mean(metric))
        if stop and index + 1 < len(folds):
            outcome.pruned = True
            break
    return outcome
