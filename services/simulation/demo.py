"""The demo data: scikit-learn's bundled handwritten digits with one digit made rare.

Real handwriting (1,797 images of 8x8 pixels, 10 classes, shipped with scikit-learn, nothing is
downloaded). Keeping digit 8, the hardest one to find, at 2% of the data reproduces the 98:2
imbalance of the seed's medical set: 1,623 other digits and 33 eights.
"""

import numpy as np
from sklearn.datasets import load_digits

from services.simulation.config import Arm, SimulationConfig
from services.simulation.data import Dataset

INIT, BATCH, BUDGET = 20, 20, 300
DEMO_ARMS = (
    Arm("default", "focal"),
    Arm("random", "focal"),
    Arm("default", "ce"),
    Arm("random", "ce"),
)


def digits_with_rare_class(
    *, rare_digit: int = 8, rare_share: float = 0.02, seed: int = 0
) -> Dataset:
    """Digits as images [n, 8, 8] in [0, 1] (so the default models are those of a small image:
    the MLP on the pixels below 150 labels, the small CNN from there), with
    `rare_digit` subsampled (seeded) so that it makes up `rare_share` of the items."""
    if not 0 <= rare_digit <= 9 or not 0 < rare_share < 1:
        raise ValueError("rare_digit must be 0..9 and rare_share in (0, 1)")
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    rare = np.flatnonzero(labels == rare_digit)
    others = np.flatnonzero(labels != rare_digit)
    n_rare = round(rare_share / (1 - rare_share) * len(others))
    kept = np.random.default_rng(seed).choice(rare, size=min(n_rare, len(rare)), replace=False)
    keep = np.sort(np.concatenate([others, kept]))
    return Dataset(items=(digits.images[keep] / 16.0).astype(np.float32), labels=labels[keep])


def demo_config(
    *,
    arms: tuple[Arm, ...],
    seeds: int,
    workers: int,
    full_pool_reference: bool = False,
    random_budget: int | None = None,
) -> SimulationConfig:
    """The demo setting's schedule: digit 8 rare, 20 initial labels, batches of 20, up to 300
    labels (random arms up to `random_budget` when given)."""
    return SimulationConfig(
        arms=arms,
        seeds=seeds,
        rounds=(max(BUDGET, random_budget or 0) - INIT) // BATCH,
        batch=BATCH,
        init=INIT,
        budget=BUDGET,
        random_budget=random_budget,
        rare_class=8,
        workers=workers,
        full_pool_reference=full_pool_reference,
    )
