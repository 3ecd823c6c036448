"""What a simulation runs: arms (a strategy and a loss, as project settings), seeds, the label
schedule (initial labels, batch, rounds, budget) and the annotator's noise."""

from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from labeling.simulated import check_noise
from services.errors import InvalidInput
from services.ml.losses import ALPHA_SCHEMES, AlphaScheme
from services.ml.metrics import default_minority_class
from services.ml.train import LossSpec
from services.recipe import default_recipe
from services.selection.config import SelectionConfig
from services.simulation.data import Dataset, check_fits_product

LossKind = Literal["focal", "ce"]
DEFAULT_STRATEGY = "default"


@dataclass(frozen=True)
class Arm:
    """strategy: "default" (the project default configuration) or a strategy name, run as plain
    top-k without wrappers or exploration; loss: "focal" (with the configured gamma/alpha) or
    "ce" (plain cross-entropy)."""

    strategy: str
    loss: LossKind

    @property
    def name(self) -> str:
        return f"{self.strategy}/{self.loss}"


@dataclass(frozen=True)
class SimulationConfig:
    """What to run. init: labels each seed starts with (uniform, seeded: the pool's seed labels;
    0 lets the product's cold start pick the first batch). budget: stop once this many labels
    are in (None = rounds decide); random_budget: a larger budget for random arms
    (labels-to-target needs them to go far); full_pool_reference: also train the default
    model on each seed's whole pool, whose minority F1 is labels-to-target's target.
    plateau_rounds: stop when validation minority F1 has not improved for this many rounds; it
    judges only rounds trained with a validation split (from 500 labels on with the default
    training), so below that it never fires. threads: torch threads per run."""

    arms: tuple[Arm, ...]
    seeds: int = 5
    rounds: int = 15
    batch: int = 20
    init: int = 20
    budget: int | None = None
    random_budget: int | None = None
    rare_class: int | None = None
    gamma: float | None = None
    alpha: AlphaScheme | None = None
    noise: float = 0.0
    plateau_rounds: int | None = None
    test_fraction: float = 0.3
    workers: int = 2
    threads: int = 1
    full_pool_reference: bool = True

    def loss_settings(self, arm: Arm) -> dict[str, Any]:
        """The arm's project loss settings (LossSpec)."""
        if arm.loss == "ce":
            return LossSpec(kind="ce", gamma=0.0, alpha=None, prior_bias=False).to_dict()
        loss = default_recipe().loss
        if self.gamma is not None:
            loss = replace(loss, gamma=self.gamma)
        if self.alpha is not None:
            loss = replace(loss, alpha=self.alpha)
        return loss.to_dict()

    def selection_settings(self, arm: Arm) -> dict[str, Any]:
        """The arm's project selection settings (SelectionConfig)."""
        if arm.strategy == DEFAULT_STRATEGY:
            return SelectionConfig().to_dict()
        return SelectionConfig(
            strategy=arm.strategy, oversample=None, quota_min_share=None, explore_share=0.0
        ).to_dict()

    def budget_for(self, arm: Arm) -> int | None:
        if arm.strategy == "random" and self.random_budget is not None:
            return self.random_budget
        return self.budget

    def labels_for(self, arm: Arm) -> int:
        """The labels an arm ends with: its budget or the rounds' worth, whichever is less."""
        rounds_worth = self.init + self.rounds * self.batch
        budget = self.budget_for(arm)
        return rounds_worth if budget is None else min(budget, rounds_worth)


def with_random_baselines(arms: tuple[Arm, ...] | list[Arm]) -> tuple[Arm, ...]:
    """The arms plus, for every loss among them, a random arm with that loss (once)."""
    out = list(dict.fromkeys(arms))
    for loss in dict.fromkeys(a.loss for a in arms):
        if Arm("random", loss) not in out:
            out.append(Arm("random", loss))
    return tuple(out)


def validate(dataset: Dataset, config: SimulationConfig) -> int:
    """Check the request against the data; returns the minority class."""
    n_classes = dataset.n_classes
    if n_classes < 2:
        raise InvalidInput("y holds a single class: there is nothing to classify")
    check_fits_product(dataset)
    if config.rare_class is not None and not (
        0 <= config.rare_class < n_classes and np.any(dataset.labels == config.rare_class)
    ):
        raise InvalidInput(
            f"--rare-class {config.rare_class} does not occur in y "
            f"(classes present: {sorted(set(dataset.labels.tolist()))})"
        )
    pool_size = (
        len(dataset.labels)
        if dataset.test_items is not None
        else int(len(dataset.labels) * (1 - config.test_fraction))
    )
    if config.batch < 1 or config.init < 0 or config.seeds < 1 or config.rounds < 0:
        raise InvalidInput("--batch and --seeds must be >= 1, --init and --rounds >= 0")
    if config.batch > pool_size - config.init:
        raise InvalidInput(
            f"--batch {config.batch} is larger than the unlabeled pool "
            f"({pool_size - config.init} items after {config.init} initial labels)"
        )
    if config.alpha is not None and config.alpha not in ALPHA_SCHEMES:
        raise InvalidInput(f"--alpha must be one of {', '.join(ALPHA_SCHEMES)}")
    if config.budget is not None and config.budget < config.init:
        raise InvalidInput(f"--budget {config.budget} is below --init {config.init}")
    check_noise(config.noise)
    rows = dataset.items.reshape(len(dataset.items), -1)
    if len(np.unique(rows, axis=0)) < len(rows):
        # A project keeps one item per content (items are deduplicated by their bytes).
        raise InvalidInput("X holds repeated rows; a project keeps one of each: remove them")
    if config.rare_class is not None:
        return config.rare_class
    return default_minority_class(dataset.labels, n_classes)
