"""`focalloop bench review`: how often the label-noise review questions a correct label, and how
much of the noise it finds, on the demo's data and schedule.

Each seed labels the demo's digits (32x32 images as the network sees them, [0, 1]) the way a
project grows: batches of `batch` items drawn at random, answered by the simulated annotator
(`labeling.simulated.simulated_answer`: with probability `noise` a uniformly drawn wrong class),
up to `labels`. After every batch the product's `review_candidates` runs on every label so far
with the Label Studio defaults (the threshold unless `--threshold` is given, the per-cycle
limit), and each item is reviewed at most once, as `plan_reviews` does. Counted over the whole
run:

    false flags per 100 clean   flags on correct labels per 100 correct labels
    precision                   flags on wrong labels / flags
    recall                      wrong labels flagged / wrong labels

Items are drawn at random rather than by the loop's selection (which needs the whole cycle);
the selection's hard items are, if anything, harder to vouch for, so read the figures as a
floor of the false flags.
"""

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from sklearn.utils import Bunch

from labeling.label_studio.link import DEFAULT_REVIEW_THRESHOLD, DEFAULT_REVIEWS_PER_CYCLE
from labeling.simulated import simulated_answer
from services.cycle.review import review_candidates
from services.errors import InvalidInput

DATASETS: dict[str, Callable[[], Bunch]] = {"wine": load_wine, "breast_cancer": load_breast_cancer}


@dataclass(frozen=True)
class ReviewRun:
    data: str
    seed: int
    noise: float
    labels: int
    wrong: int
    flagged: int
    false_flags: int

    @property
    def clean(self) -> int:
        return self.labels - self.wrong

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dataset(name: str) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Inputs as the network sees them and the truth: `digits`, the demo's images ([n, 1, 32,
    32] in [0, 1]); `wine` and `breast_cancer`, scikit-learn's feature tables (a features
    project's raw rows), which the review was not tuned on."""
    if name == "digits":
        digits = load_digits()
        upscaled = np.kron(digits.images / 16.0, np.ones((4, 4))).astype(np.float32)
        return upscaled[:, None, :, :], digits.target.astype(np.int64)
    if name in DATASETS:
        table = DATASETS[name]()
        return table.data.astype(np.float32), table.target.astype(np.int64)
    raise InvalidInput(f"dataset must be digits, {' or '.join(DATASETS)}, got {name!r}")


def run_review(
    seed: int,
    noise: float,
    *,
    labels: int,
    batch: int,
    data: str = "digits",
    threshold: float = DEFAULT_REVIEW_THRESHOLD,
) -> ReviewRun:
    images, truth = dataset(data)
    n_classes = int(truth.max()) + 1
    names = [str(label) for label in range(n_classes)]
    order = np.random.default_rng(seed).permutation(len(truth))[:labels]
    given = np.array(
        [
            int(simulated_answer(str(truth[i]), names, noise=noise, seed=seed, key=str(i)))
            for i in order
        ]
    )
    reviewed: set[int] = set()
    for size in range(batch, labels + 1, batch):
        rows = order[:size]
        candidates = review_candidates(
            images[rows],
            given[:size],
            rows.astype(np.int64),
            n_classes=n_classes,
            threshold=threshold,
            limit=DEFAULT_REVIEWS_PER_CYCLE,
            seed=seed * 1000 + size,
        )
        reviewed.update(c.item_id for c in candidates)
    wrong_items = {int(i) for i, g in zip(order, given, strict=True) if truth[i] != g}
    return ReviewRun(
        data=data,
        seed=seed,
        noise=noise,
        labels=labels,
        wrong=len(wrong_items),
        flagged=len(reviewed),
        false_flags=len(reviewed - wrong_items),
    )


def summary(runs: list[ReviewRun]) -> dict[str, dict[str, float | None]]:
    """Per noise level: the figures above pooled over seeds, and the spread of the false-flag
    rate over seeds (min, median, max)."""
    table = {}
    for noise in sorted({run.noise for run in runs}):
        mine = [run for run in runs if run.noise == noise]
        flagged = sum(run.flagged for run in mine)
        wrong = sum(run.wrong for run in mine)
        true_flags = sum(run.flagged - run.false_flags for run in mine)
        rates = [100.0 * run.false_flags / max(run.clean, 1) for run in mine]
        table[f"noise {noise:g}"] = {
            "seeds": len(mine),
            "false_flags_per_100_clean": 100.0
            * sum(r.false_flags for r in mine)
            / max(sum(r.clean for r in mine), 1),
            "false_flags_per_100_clean_min": min(rates),
            "false_flags_per_100_clean_median": statistics.median(rates),
            "false_flags_per_100_clean_max": max(rates),
            # None (JSON null) where there is nothing to divide by.
            "precision": true_flags / flagged if flagged else None,
            "recall": true_flags / wrong if wrong else None,
        }
    return table


def bench_review(
    *,
    seeds: int = 10,
    labels: int = 300,
    batch: int = 20,
    data: str = "digits",
    threshold: float = DEFAULT_REVIEW_THRESHOLD,
    noises: tuple[float, ...] = (0.0, 0.1),
) -> list[ReviewRun]:
    dataset(data)  # a bad name fails before any work
    return [
        run_review(seed, noise, labels=labels, batch=batch, data=data, threshold=threshold)
        for noise in noises
        for seed in range(seeds)
    ]
