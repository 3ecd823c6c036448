"""The training recipe: the measured defaults a project starts with, and the fit that applies
them (from scratch, or fine-tuning the previous model where that saves real compute).

Pure apart from the `Project` row it reads settings from: arrays in, a trained model out.
"""

import math
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from services.ml.nets import Classifier, ModelSpec
from services.ml.train import (
    DeviceChoice,
    EpochCallback,
    LossSpec,
    TrainConfig,
    TrainResult,
    train,
)
from services.models import Project
from services.selection.config import SelectionConfig


@dataclass(frozen=True)
class Recipe:
    """How a cycle trains and selects. warm_start_steps: when the previous model is given,
    fine-tune it for about this many optimizer steps (whole epochs) instead of training from
    scratch (None = always from scratch)."""

    loss: LossSpec = field(default_factory=LossSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    warm_start_steps: int | None = None


def default_recipe() -> Recipe:
    """What a project starts with. Each choice was measured on the demo setting
    (docs/architecture.md, "Why the default configuration is what it is")."""
    return Recipe(
        loss=LossSpec(kind="focal", gamma=2.0, alpha="effective_number", prior_bias=True),
        # Below 500 labels nothing is held out: every label trains, for 100 epochs. Early
        # stopping on a few dozen held-out items stopped models that were still learning, and
        # the held-out share costs the rare class its scarcest examples.
        train=TrainConfig(
            max_epochs=100, patience=15, learning_rate=3e-3, val_fraction=0.2, min_val_items=100
        ),
        selection=SelectionConfig(),
        # Once a cycle's from-scratch training would exceed 200 steps, fine-tune the previous
        # model for 100 instead: the same minority F1 at 300 labels in half the time.
        warm_start_steps=100,
    )


def project_recipe(
    project: Project, *, device: DeviceChoice = "auto", threads: int | None = None
) -> Recipe:
    """The project's loss and selection settings on top of the defaults; training runs on
    `device` with `threads` CPU threads (the process's settings)."""
    base = default_recipe()
    return Recipe(
        loss=LossSpec.from_dict(project.loss_config),
        train=replace(base.train, device=device, threads=threads),
        selection=SelectionConfig.from_dict(project.selection_config),
        warm_start_steps=base.warm_start_steps,
    )


class PreviousModel(Protocol):
    """What a warm start needs of the last model: a `TrainResult` or a loaded `Checkpoint`."""

    @property
    def model(self) -> Classifier: ...

    @property
    def spec(self) -> ModelSpec: ...


def fit(
    *,
    items: NDArray[Any],
    labels: NDArray[np.int64],
    spec: ModelSpec,
    recipe: Recipe,
    seed: int,
    previous: PreviousModel | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train on labeled items: items [m, *item_shape], labels [m] class indices.

    With `previous` (the current model, same architecture) and `warm_start_steps` set, the
    previous weights are fine-tuned for that many optimizer steps, rounded up to whole epochs (a
    budget in epochs would starve small sets, whose epochs are a single step), but only where
    that saves real compute: when training from scratch would take more than twice as many
    steps. Fresh training generalizes better than warm starts (Ash & Adams 2020), and on small
    sets it is cheap.
    """
    overrides: dict[str, Any] = {"seed": seed}
    init_state = None
    steps_per_epoch = math.ceil(len(labels) / recipe.train.batch_size)
    from_scratch_steps = recipe.train.max_epochs * steps_per_epoch
    warm = recipe.warm_start_steps
    if (
        previous is not None
        and warm is not None
        and previous.spec == spec
        and from_scratch_steps > 2 * warm
    ):
        init_state = previous.model.state_dict()
        overrides["max_epochs"] = max(1, math.ceil(warm / steps_per_epoch))
    return train(
        items=items,
        labels=labels,
        spec=spec,
        loss=recipe.loss,
        config=replace(recipe.train, **overrides),
        init_state=init_state,
        on_epoch=on_epoch,
    )


def scalar_gamma(loss: LossSpec) -> float:
    """The loss's gamma as one number: expected-focal scoring takes one gamma, so a per-class
    gamma is summarized by its mean."""
    return float(np.mean(loss.gamma)) if isinstance(loss.gamma, tuple) else float(loss.gamma)
